"""Datasets as uint8 faces + labels, and the batches the model is fed.

Both formats end up as the same :class:`Dataset`: canonical split names
(Training / PublicTest / PrivateTest) mapped to a :class:`Split` of uint8 faces.
Faces only become model inputs through ``services.model.preprocess.preprocess_faces``,
the function the classifier service uses too, so training and serving cannot drift.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from services.common.protocol import EMOTIONS
from services.model.preprocess import InputSpec, preprocess_faces

log = logging.getLogger(__name__)

TRAIN, VAL, TEST = "Training", "PublicTest", "PrivateTest"
SPLITS = (TRAIN, VAL, TEST)
ALL = "all"  # every face of the dataset, whatever split it is in
FER_SIZE = 48
FER_COLUMNS = ("emotion", "pixels", "Usage")

# Folder names accepted for the splits of an image-folder dataset.
SPLIT_ALIASES = {
    "training": TRAIN,
    "train": TRAIN,
    "publictest": VAL,
    "val": VAL,
    "valid": VAL,
    "validation": VAL,
    "privatetest": TEST,
    "test": TEST,
}
# Folder names accepted for the classes: the index, the class name, common synonyms.
CLASS_ALIASES = {
    "anger": "angry",
    "disgusted": "disgust",
    "fearful": "fear",
    "scared": "fear",
    "happiness": "happy",
    "sadness": "sad",
    "surprised": "surprise",
}
IMAGE_SUFFIXES = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
    ".pgm",
    ".ppm",
    ".pbm",
    ".pnm",
    ".jp2",
    ".sr",
    ".ras",
    ".exr",
    ".hdr",
    ".avif",
}


class DataError(Exception):
    """A dataset problem, worded for the person who has to fix the data."""


@dataclass
class Split:
    """uint8 faces, an (N,H,W[,3]) array, or a list of such images when sizes differ."""

    faces: np.ndarray | list
    labels: np.ndarray
    targets: np.ndarray | None = None  # soft training targets, one row of 7 per face
    rows: np.ndarray | None = None  # each face's position in the whole split, once subset
    majority: np.ndarray | None = None  # FER+ majority class per face, -1 where there is none

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> Split:
        if isinstance(self.faces, np.ndarray):
            faces = self.faces[indices]
        else:
            faces = [self.faces[i] for i in indices]
        targets = None if self.targets is None else self.targets[indices]
        majority = None if self.majority is None else self.majority[indices]
        return Split(faces, self.labels[indices], targets, self.positions()[indices], majority)

    def positions(self) -> np.ndarray:
        """Where each face sits in the split it was loaded as (for folds)."""
        return np.arange(len(self)) if self.rows is None else self.rows

    def training_targets(self) -> np.ndarray:
        """What the model learns from: the soft targets if any, else the one-hot labels."""
        return one_hot(self.labels) if self.targets is None else self.targets

    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(EMOTIONS)).tolist()


@dataclass
class Dataset:
    path: str
    format: str
    splits: dict[str, Split] = field(default_factory=dict)

    pooled: bool = False  # a folder of class folders only: its splits are drawn from one pool

    def split(self, name: str) -> Split:
        if name == ALL:
            return concatenate([s for s in self.splits.values() if len(s)])
        if name not in self.splits or len(self.splits[name]) == 0:
            have = ", ".join(f"{k} ({len(v)})" for k, v in self.splits.items()) or "none"
            raise DataError(f"{self.path}: split {name!r} has no rows (splits here: {have})")
        return self.splits[name]

    def sizes(self) -> dict[str, int]:
        return {name: len(split) for name, split in self.splits.items()}


def load_dataset(path, fmt: str = "auto", val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Load a FER2013-style CSV or a folder of class folders (see docs/models.md)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if fmt == "auto":
        fmt = "folders" if path.is_dir() else "csv"
    if fmt == "csv":
        if path.is_dir():
            raise DataError(f"{path}: is a directory, expected a CSV file (or use --data-format folders)")
        return load_csv(path)
    if fmt == "folders":
        if not path.is_dir():
            raise DataError(f"{path}: is not a directory of class folders")
        return load_folders(path, val_fraction, seed)
    raise DataError(f"unknown data format {fmt!r} (auto, csv or folders)")


# --- FER2013 CSV -------------------------------------------------------------------------


def load_csv(path: Path) -> Dataset:
    """Parse ``emotion,pixels,Usage`` rows; every error names the file and the line."""
    pixels_per_face = FER_SIZE * FER_SIZE
    faces, labels, usages = [], [], []
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [c for c in FER_COLUMNS if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: missing column(s) {', '.join(missing)} "
                f"(expected a header with {', '.join(FER_COLUMNS)})"
            )
        i_label, i_pixels, i_usage = (header.index(c) for c in FER_COLUMNS)
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, the header has {len(header)}")
            labels.append(_parse_label(row[i_label], path, line))
            faces.append(_parse_pixels(row[i_pixels], pixels_per_face, path, line))
            usage = row[i_usage].strip()
            if usage not in SPLITS:
                raise DataError(
                    f"{path}:{line}: unknown Usage {usage!r} (expected one of {', '.join(SPLITS)})"
                )
            usages.append(usage)
    if not labels:
        raise DataError(f"{path}: empty dataset (no rows after the header)")
    faces = np.stack(faces).reshape(-1, FER_SIZE, FER_SIZE)
    labels = np.asarray(labels, np.int64)
    usages = np.asarray(usages)
    return Dataset(
        str(path), "csv", {name: Split(faces[usages == name], labels[usages == name]) for name in SPLITS}
    )


def _parse_label(text: str, path: Path, line: int) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DataError(f"{path}:{line}: emotion {text!r} is not an integer") from None
    if not 0 <= label < len(EMOTIONS):
        raise DataError(f"{path}:{line}: emotion {label} outside 0..{len(EMOTIONS) - 1}")
    return label


def _parse_pixels(text: str, expected: int, path: Path, line: int) -> np.ndarray:
    try:
        values = np.fromstring(text, dtype=np.int32, sep=" ")  # C speed for the good rows
    except ValueError:
        values = None
    if values is None or values.size != expected:
        tokens = text.split()
        bad = next((t for t in tokens if not t.lstrip("-").isdigit()), None)
        if bad is not None:
            raise DataError(f"{path}:{line}: pixel value {bad!r} is not an integer")
        raise DataError(
            f"{path}:{line}: {len(tokens)} pixel values, expected {expected} ({FER_SIZE}x{FER_SIZE})"
        )
    if values.min() < 0 or values.max() > 255:
        raise DataError(f"{path}:{line}: pixel values must be 0..255")
    return values.astype(np.uint8)


# --- image folders ---------------------------------------------------------------------


def class_index(folder_name: str) -> int | None:
    """The class a folder holds, from its index or (aliased) name; None if unknown."""
    name = folder_name.strip().lower()
    if name.isdigit():
        index = int(name)
        return index if index < len(EMOTIONS) else None
    name = CLASS_ALIASES.get(name, name)
    names = [e.lower() for e in EMOTIONS]
    return names.index(name) if name in names else None


def load_folders(root: Path, val_fraction: float, seed: int) -> Dataset:
    """Split folders (train/val/test or Training/PublicTest/PrivateTest) of class folders,
    or just class folders. Without a validation folder, a seeded ``val_fraction`` of
    the training faces becomes PublicTest."""
    split_dirs = {}
    for child in sorted(root.iterdir()):
        split = SPLIT_ALIASES.get(child.name.lower()) if child.is_dir() else None
        if split is not None:
            if split in split_dirs:
                raise DataError(
                    f"{root}: both {split_dirs[split].name}/ and {child.name}/ are the {split} split"
                )
            split_dirs[split] = child
    dataset = Dataset(str(root), "folders")
    if split_dirs:
        for split, folder in split_dirs.items():
            dataset.splits[split] = _load_class_folders(folder)
        if TRAIN not in dataset.splits:
            raise DataError(f"{root}: split folders found but none for training (train/ or Training/)")
        if VAL not in dataset.splits:
            dataset.splits[TRAIN], dataset.splits[VAL] = _split_off(dataset.splits[TRAIN], val_fraction, seed)
    else:
        pool = _load_class_folders(root)
        dataset.splits[TRAIN], dataset.splits[VAL] = _split_off(pool, val_fraction, seed)
        dataset.pooled = True
    return dataset


def concatenate(splits: list[Split]) -> Split:
    """One split holding the faces of several (arrays where the sizes allow, else a list)."""
    if len(splits) == 1:
        return splits[0]
    labels = np.concatenate([s.labels for s in splits])
    if all(isinstance(s.faces, np.ndarray) for s in splits) and len({s.faces.shape[1:] for s in splits}) == 1:
        return Split(np.concatenate([s.faces for s in splits]), labels)
    return Split([face for s in splits for face in s.faces], labels)


def _load_class_folders(folder: Path) -> Split:
    faces, labels = [], []
    for child in sorted(folder.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        label = class_index(child.name)
        if label is None:
            log.warning("%s: not one of the classes %s, skipped", child, ", ".join(EMOTIONS))
            continue
        files = [
            p
            for p in sorted(child.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise DataError(f"{child}: empty class folder (no images)")
        for file in files:
            faces.append(read_face(file))
            labels.append(label)
    if not faces:
        raise DataError(
            f"{folder}: empty dataset (no class folders with images; "
            f"expected subfolders named 0..6 or {', '.join(e.lower() for e in EMOTIONS)})"
        )
    shapes = {face.shape for face in faces}
    stacked = np.stack(faces) if len(shapes) == 1 else faces
    return Split(stacked, np.asarray(labels, np.int64))


def read_face(file: Path) -> np.ndarray:
    """Any image OpenCV reads -> uint8 grey (H,W) or BGR (H,W,3)."""
    image = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise DataError(f"{file}: cannot be read as an image")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 3:
        if image.shape[2] == 1:
            image = image[:, :, 0]
        elif image.shape[2] == 2:  # grey + alpha
            image = image[:, :, 0]
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image)


def _split_off(pool: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A seeded, stratified split: ``fraction`` of every class goes to validation."""
    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be between 0 and 1, not {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(pool.labels):
        members = rng.permutation(np.flatnonzero(pool.labels == label))
        take = int(round(len(members) * fraction)) if len(members) > 1 else 0
        val.extend(members[:take])
    val_mask = np.zeros(len(pool), bool)
    val_mask[np.asarray(val, np.int64)] = True
    # each is a split of its own: positions count from its first face, not the pool's
    return (
        replace(pool.subset(np.flatnonzero(~val_mask)), rows=None),
        replace(pool.subset(np.flatnonzero(val_mask)), rows=None),
    )


# --- FER+ votes --------------------------------------------------------------------------

FERPLUS_COLUMNS = (
    "neutral",
    "happiness",
    "surprise",
    "sadness",
    "anger",
    "disgust",
    "fear",
    "contempt",
    "unknown",
    "NF",
)
# FER+ vote column -> our class index; contempt, unknown and NF have no class of ours.
FERPLUS_CLASSES = {
    "anger": 0,
    "disgust": 1,
    "fear": 2,
    "happiness": 3,
    "sadness": 4,
    "surprise": 5,
    "neutral": 6,
}


@dataclass
class FerPlusVotes:
    """The FER+ taggers' votes for the rows of one FER2013 split, in CSV order."""

    votes: np.ndarray  # (N, 7) votes per class of ours
    not_face: np.ndarray  # (N,) votes for "not a face"
    total: np.ndarray  # (N,) all votes, contempt and unknown included
    counts: np.ndarray  # (N, 10) the votes of every FERPLUS_COLUMNS column
    path: str = ""
    split: str = TRAIN

    def majority(self) -> np.ndarray:
        """The class most taggers chose, per face; -1 where that is contempt, unknown or
        not a face, where two or more columns tie for most votes, or where nobody voted."""
        top = self.counts.max(axis=1)
        tied = (self.counts == top[:, None]).sum(axis=1) > 1
        ours = np.full(len(FERPLUS_COLUMNS), -1)
        for name, index in FERPLUS_CLASSES.items():
            ours[FERPLUS_COLUMNS.index(name)] = index
        winner = ours[self.counts.argmax(axis=1)]
        return np.where((top > 0) & ~tied, winner, -1)

    def check_rows(self, split: Split) -> None:
        if len(self.votes) != len(split):
            raise DataError(
                f"{self.path}: FER+ votes for {len(self.votes)} rows, the split has {len(split)} "
                f"({self.split}): the vote file must list the rows of this dataset in its order "
                f"(python -m training ferplus-votes writes one)"
            )


def load_ferplus(path, split_name: str = TRAIN, required: bool = True) -> FerPlusVotes | None:
    """Read FER+ vote counts (``Usage, Image name, neutral, …, NF``) for one split (None
    if the file has no rows for it and they are not ``required``)."""
    path = Path(path)
    try:
        f = open(path, newline="")
    except OSError as exc:
        raise DataError(f"{path}: cannot read FER+ votes ({exc.strerror})") from None
    rows = []
    with f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        missing = [c for c in ("Usage", *FERPLUS_COLUMNS) if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: missing column(s) {', '.join(missing)} "
                f"(expected Usage, Image name, {', '.join(FERPLUS_COLUMNS)})"
            )
        i_usage = header.index("Usage")
        columns = [header.index(c) for c in FERPLUS_COLUMNS]
        for row in reader:
            line = reader.line_num
            if not row or row[i_usage].strip() != split_name:
                continue
            try:
                counts = [int(row[i]) for i in columns]
            except (ValueError, IndexError):
                raise DataError(
                    f"{path}:{line}: vote counts must be integers in columns {', '.join(FERPLUS_COLUMNS)}"
                ) from None
            if min(counts) < 0:
                raise DataError(f"{path}:{line}: negative vote count")
            rows.append(counts)
    if not rows:
        if not required:
            return None
        raise DataError(f"{path}: no {split_name} rows")
    table = np.asarray(rows, np.float32)
    ours = [FERPLUS_COLUMNS.index(name) for name, _ in sorted(FERPLUS_CLASSES.items(), key=lambda kv: kv[1])]
    return FerPlusVotes(
        table[:, ours], table[:, FERPLUS_COLUMNS.index("NF")], table.sum(1), table, str(path), split_name
    )


def with_majority(split: Split, ferplus: FerPlusVotes | None) -> Split:
    """``split`` knowing each face's FER+ majority class, for scoring against it (as it is
    when there are no votes for it)."""
    if ferplus is None:
        return split
    ferplus.check_rows(split)
    return replace(split, majority=ferplus.majority())


def with_ferplus(
    split: Split, ferplus: FerPlusVotes, weight: float, drop_not_faces: bool, majority: bool = False
) -> Split:
    """``split`` with soft targets: ``weight`` x the FER+ vote shares over our 7 classes + the
    rest x the FER2013 label. Rows without votes for our classes keep their label; with
    ``drop_not_faces``, faces most taggers called "not a face" are left out.

    With ``majority``, each face learns its FER+ majority class alone (it becomes its label),
    and faces without one (see :meth:`FerPlusVotes.majority`) are left out."""
    ferplus.check_rows(split)
    if majority:
        winners = ferplus.majority()
        keep = np.flatnonzero(winners >= 0)
        return replace(split.subset(keep), labels=winners[keep], targets=None)
    if not 0 <= weight <= 1:
        raise DataError(f"--ferplus-weight {weight}: must be between 0 and 1")
    labels = one_hot(split.labels)
    counted = ferplus.votes.sum(1, keepdims=True)
    shares = np.divide(ferplus.votes, counted, out=labels.copy(), where=counted > 0)
    mixed = Split(
        split.faces, split.labels, (weight * shares + (1 - weight) * labels).astype(np.float32), split.rows
    )
    if not drop_not_faces:
        return mixed
    return mixed.subset(np.flatnonzero(ferplus.not_face * 2 <= ferplus.total))


# --- from faces to batches -------------------------------------------------------------


def model_inputs(faces, spec: InputSpec) -> np.ndarray:
    """preprocess_faces over an array, or image by image over a list of mixed sizes."""
    if isinstance(faces, np.ndarray):
        return preprocess_faces(faces, spec)
    if not faces:
        return np.empty((0, *spec.shape), np.float32)
    return np.concatenate([preprocess_faces(face[None], spec) for face in faces])


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Training targets for class indices: one row of 7 per face."""
    return np.eye(len(EMOTIONS), dtype=np.float32)[labels]


def subsample(split: Split, limit: int | None, seed: int) -> Split:
    """A seeded random subset of at most ``limit`` faces (for quick runs)."""
    if not limit or limit >= len(split):
        return split
    keep = np.sort(np.random.default_rng(seed).choice(len(split), limit, replace=False))
    return split.subset(keep)


FOLD_SEED = 2013  # the same folds for every run, so fold models of one dataset fit together


def fold_ids(labels: np.ndarray, folds: int) -> np.ndarray:
    """Each face's fold, 0 to ``folds`` - 1: every class dealt round-robin over the folds in
    a fixed shuffled order, so each fold has its share of every class."""
    if folds < 2:
        raise DataError(f"--folds {folds}: needs at least 2")
    rng = np.random.default_rng(FOLD_SEED)
    out = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        out[members] = np.arange(len(members)) % folds
    return out


def folds_of(split: Split, whole_labels: np.ndarray, folds: int) -> np.ndarray:
    """The fold of each face of ``split``, a part of the split whose labels are
    ``whole_labels``: folds are always drawn over the whole split, as loaded."""
    return fold_ids(whole_labels, folds)[split.positions()]


def oversample_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices repeating every class up to the majority class's count."""
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels)
    target = counts.max()
    out = []
    for label in np.flatnonzero(counts):
        members = np.flatnonzero(labels == label)
        reps, extra = divmod(target, len(members))
        out.append(np.tile(members, reps))
        out.append(rng.choice(members, extra, replace=False))
    return np.sort(np.concatenate(out))


def balanced_class_weights(labels: np.ndarray, n_classes: int = len(EMOTIONS)) -> np.ndarray:
    """sklearn's 'balanced' weights, n / (k * n_c), over the classes present (1.0 if absent)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    present = counts > 0
    weights = np.ones(n_classes)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return weights
