"""The labelled face-detection set: its annotations (committed here) and a loader for its
media (not committed: ``python -m bench.detection_set.fetch_media`` copies them out of clones
of their source repositories into a folder).

The media folder holds each file at ``<source>/<path>`` (for instance
``deepface/tests/unit/dataset/img1.jpg``); a video frame is read from its clip by index.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from bench.detection_metrics import POSES, Truth

HERE = Path(__file__).resolve().parent
ANNOTATIONS = HERE / "annotations.json"


class MediaError(RuntimeError):
    """Media missing or not the labelled file, worded for the person running the benchmark."""


@dataclass(frozen=True)
class Entry:
    """One labelled image or video frame."""

    id: str
    source: str
    path: str  # inside its source repository
    frame: int | None  # index of the frame in a video, None for a still image
    sha256: str  # of the file (the whole clip, for a frame)
    size: tuple[int, int]  # width, height of the image as labelled
    faces: tuple[Truth, ...]  # boxes in the labelled image's pixels

    @property
    def file(self) -> str:
        """Where the file lies in the media folder."""
        return f"{self.source}/{self.path}"

    def faces_at(self, scale: float) -> list[Truth]:
        """The labelled faces, boxes scaled by ``scale`` (the image resized by it)."""
        return [Truth(tuple(v * scale for v in face.box), face.pose, face.ignore) for face in self.faces]


def load(path: Path = ANNOTATIONS) -> tuple[dict, list[Entry]]:
    """The sources (repository, commit, licence) and the labelled images of the set."""
    data = json.loads(Path(path).read_text())
    entries = []
    for image in data["images"]:
        faces = []
        for face in image["faces"]:
            if face["pose"] not in POSES:
                raise ValueError(f"{image['id']}: unknown pose {face['pose']!r}")
            faces.append(Truth(tuple(face["box"]), face["pose"], bool(face.get("ignore", False))))
        entries.append(
            Entry(
                image["id"],
                image["source"],
                image["path"],
                image.get("frame"),
                image["sha256"],
                tuple(image["size"]),
                tuple(faces),
            )
        )
    return data["sources"], entries


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_media(media: Path, entries: list[Entry]) -> None:
    """Every file the set needs is in ``media`` and is the file that was labelled."""
    media = Path(media)
    missing, wrong, checked = [], [], set()
    for entry in entries:
        if entry.file in checked:
            continue
        checked.add(entry.file)
        path = media / entry.file
        if not path.is_file():
            missing.append(entry.file)
        elif sha256_of(path) != entry.sha256:
            wrong.append(entry.file)
    problems = []
    if missing:
        problems.append(f"{len(missing)} file(s) missing, e.g. {', '.join(missing[:3])}")
    if wrong:
        problems.append(f"{len(wrong)} file(s) differ from the labelled ones, e.g. {', '.join(wrong[:3])}")
    if problems:
        raise MediaError(
            f"the detection set's media in {media}: {'; '.join(problems)}. "
            "Copy them with `python -m bench.detection_set.fetch_media --out DIR` "
            "(see bench/detection_set/README.md)"
        )


def read_frames(path: Path, indices: set[int]) -> dict[int, np.ndarray]:
    """The frames of a clip at ``indices``, decoded in order from the start (seeking is
    not exact for every codec)."""
    cap = cv2.VideoCapture(str(path))
    frames, index = {}, 0
    try:
        while len(frames) < len(indices):
            ok, frame = cap.read()
            if not ok:
                break
            if index in indices:
                frames[index] = frame
            index += 1
    finally:
        cap.release()
    return frames


def read(media: Path, entry: Entry, frames: dict | None = None) -> np.ndarray:
    """The image (BGR) of one entry, as labelled; ``frames`` caches decoded clip frames."""
    path = Path(media) / entry.file
    if entry.frame is None:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    else:
        frames = {} if frames is None else frames
        if (entry.file, entry.frame) not in frames:
            frames.update({(entry.file, i): f for i, f in read_frames(path, {entry.frame}).items()})
        image = frames.get((entry.file, entry.frame))
    if image is None:
        what = "it" if entry.frame is None else f"frame {entry.frame}"
        raise MediaError(f"{path}: cannot read {what}")
    if (image.shape[1], image.shape[0]) != entry.size:
        raise MediaError(
            f"{path}: {image.shape[1]}x{image.shape[0]}, labelled at {entry.size[0]}x{entry.size[1]}"
        )
    return image


def images(
    media: Path, max_width: int = 0, entries: list[Entry] | None = None
) -> Iterator[tuple[Entry, np.ndarray, list[Truth]]]:
    """(entry, image, faces) for each labelled image, after checking all the media are there.
    With ``max_width``, wider images are downscaled to it (as capture does) and the boxes with
    them."""
    if entries is None:
        entries = load()[1]
    check_media(media, entries)
    frames = {}
    for file in {e.file for e in entries if e.frame is not None}:
        wanted = {e.frame for e in entries if e.file == file}
        frames.update({(file, i): f for i, f in read_frames(Path(media) / file, wanted).items()})
    for entry in entries:
        image = read(media, entry, frames)
        scale = 1.0
        width, height = entry.size
        if max_width and width > max_width:
            scale = max_width / width
            image = cv2.resize(
                image, (max_width, max(1, round(height * scale))), interpolation=cv2.INTER_AREA
            )
        yield entry, image, entry.faces_at(scale)
