"""The wire protocol every service speaks (documented in docs/protocol.md).

A message is a ZeroMQ multipart message:

    [topic, header, payload_0, payload_1, ...]

* ``topic``   -- the stream id as UTF-8 (lets subscribers filter by stream).
* ``header``  -- a msgpack map (never pickle): the envelope every :class:`Message` shares,
  plus the fields of its kind (:class:`Frame`, :class:`Faces`, :class:`Result`,
  :class:`Tracks`, :class:`Event`).
* ``payload`` -- raw bytes kept out of msgpack so images are never copied into it:
  one encoded frame for ``frame`` messages, one raw crop per face for ``faces``
  messages, nothing for the others.

Every receiver calls :func:`decode`, which validates the envelope, then hands the rest to
the kind's class (:data:`MESSAGE_TYPES`); everything is checked before any image is
decoded, and anything not accepted raises :class:`Rejected` with a short, stable
``reason`` (used as a metric label, one of :data:`REJECT_REASONS`). A new kind is one
new :class:`Message` subclass and one entry in :data:`MESSAGE_TYPES`.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar, cast

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

KIND_FRAME = "frame"  # capture -> frames, detect
KIND_FACES = "faces"  # detector -> classify
KIND_RESULT = "result"  # classifier -> results
KIND_TRACKS = "tracks"  # tracker -> tracks: a frame's results with track ids and smoothing
KIND_EVENT = "event"  # tracker -> tracks: a track started, changed emotion or ended
EVENTS = ("track_started", "emotion_changed", "track_ended")

# Streams whose id starts with this are jobs (python -m services.analyze): their frames are
# sent with flow control, so every stage takes every one of them, in order, however old.
JOB_PREFIX = "job:"


def is_job(stream: str) -> bool:
    return stream.startswith(JOB_PREFIX)


ENCODING_JPEG = "jpeg"
ENCODING_BGR = "bgr"
ENCODINGS = (ENCODING_JPEG, ENCODING_BGR)

EMOTIONS = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")

MAX_HEADER_BYTES = 256 * 1024
MAX_DIMENSION = 8192  # pixels per side of a frame
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_FACES = 256
MAX_KEYPOINTS = 16  # landmarks per face in a faces message (BlazeFace gives 6)
MAX_CROP_SIZE = 512
MAX_STREAM_ID = 128
MAX_TRACK_ID = 32
MAX_CLOCK_SKEW_S = 2.0  # default: newest timestamp accepted ahead of the receiver's clock
MAX_FRAME_PIXELS = 1920 * 1080  # default pixel limit of a decoded frame (--max-frame-pixels)
MAX_PIXELS_PER_BYTE = 1000  # libjpeg's most compressible frame (one colour) is ~170


# Why a message is not accepted: the label of emotion_messages_rejected_total, listed in
# docs/protocol.md ("Rejection reasons").
REJECT_REASONS = (
    "frames",
    "header",
    "version",
    "kind",
    "field",
    "clock",
    "dimensions",
    "encoding",
    "size",
    "image",
)


# Per-camera detector settings a frame may carry (``detect``; the camera inventory's
# ``detector:`` map): each overrides the detector option of the same name for that frame.
# name -> (least, most, multiple of)
DETECT_SETTINGS = {
    "detect_width": (0, 8192, 1),  # Haar: width of the detection copy (0: full resolution)
    "blazeface_width": (0, 1024, 32),  # BlazeFace: long side of the model's input (0: its own)
    "min_size": (1, 2048, 1),  # smallest face side, in frame pixels
}


class Rejected(ValueError):
    """A message that is not accepted; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def detect_setting_problem(name, value) -> str | None:
    """Why ``value`` cannot be the detector setting ``name`` (DETECT_SETTINGS); None if it can."""
    if name not in DETECT_SETTINGS:
        return f"not a detector setting ({', '.join(DETECT_SETTINGS)})"
    least, most, step = DETECT_SETTINGS[name]
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        return f"must be an integer from {least} to {most}, not {value!r:.40}"
    if value % step:
        return f"must be a multiple of {step}, not {value}"
    return None


def detect_map_problem(value: dict) -> tuple[str, str] | None:
    """The first setting of a detector map (a frame's ``detect``, a camera's ``detector``)
    that is wrong, as (its name, why); None when all are right."""
    for name, setting in value.items():
        problem = detect_setting_problem(name, setting)
        if problem:
            return str(name)[:40], problem
    return None


def detect_settings(value) -> dict[str, int]:
    """A frame's checked ``detect`` map; Rejected names the setting that is wrong."""
    if not isinstance(value, dict):
        raise Rejected("field", f"field 'detect' has type {type(value).__name__}")
    wrong = detect_map_problem(value)
    if wrong:
        raise Rejected("field", f"detect.{wrong[0]}: {wrong[1]}")
    return dict(value)


@dataclass
class FaceResult:
    """One classified face: its box in frame pixels and the model's 7 scores."""

    box: tuple[int, int, int, int]
    label: str
    confidence: float
    scores: list[float]

    def to_wire(self) -> dict:
        return {
            "box": list(self.box),
            "label": self.label,
            "confidence": self.confidence,
            "scores": list(self.scores),
        }


@dataclass
class TrackedFace(FaceResult):
    """A face of a ``tracks`` message: the classifier's answer plus its track's view of it.
    ``track`` is None while a new face waits to be confirmed as a track."""

    track: str | None = None
    smoothed_label: str = ""
    smoothed_scores: list[float] = field(default_factory=list)
    age_s: float = 0.0

    @property
    def smoothed_confidence(self) -> float:
        """The smoothed probability of the smoothed label."""
        return self.smoothed_scores[EMOTIONS.index(self.smoothed_label)]

    def to_wire(self) -> dict:
        return {
            **super().to_wire(),
            "track": self.track,
            "smoothed_label": self.smoothed_label,
            "smoothed_scores": list(self.smoothed_scores),
            "age_s": self.age_s,
        }


@dataclass
class TrackSummary:
    """What a ``track_ended`` event says about the whole track."""

    start: float  # capture time of its first and last frame (unix seconds)
    end: float
    frames: int
    dominant: str  # the smoothed emotion shown for the longest time
    mean_scores: list[float]  # mean raw probabilities over its frames
    shares: list[float]  # share of its time per smoothed emotion, EMOTIONS order

    def to_wire(self) -> dict:
        return {
            "start": self.start,
            "end": self.end,
            "frames": self.frames,
            "dominant": self.dominant,
            "mean_scores": list(self.mean_scores),
            "shares": list(self.shares),
        }


@dataclass
class TrackEvent:
    """``track_started``, ``emotion_changed`` (``previous`` -> ``label``) or ``track_ended``."""

    name: str
    track: str
    time: float  # capture time of the frame where it happened
    label: str  # the smoothed label at that moment
    previous: str = ""  # emotion_changed: the label before
    summary: TrackSummary | None = None  # track_ended only

    def to_wire(self) -> dict:
        wire = {"name": self.name, "track": self.track, "time": self.time, "label": self.label}
        if self.name == "emotion_changed":
            wire["previous"] = self.previous
        if self.summary is not None:
            wire["summary"] = self.summary.to_wire()
        return wire


@dataclass
class Message:
    """The envelope every kind of message shares: which frame of which stream it is about.

    Each kind is a subclass that adds its own fields, writes them in :meth:`to_wire` and
    reads and validates them in :meth:`from_wire`, after :func:`decode` checked the envelope.
    """

    KIND: ClassVar[str] = ""
    PAYLOADS: ClassVar[int | None] = 0  # payload frames it carries; None: one per box

    stream: str
    seq: int
    width: int  # size of the original frame
    height: int
    timestamps: dict[str, float] = field(default_factory=dict)  # stage -> unix time
    version: int = field(default=PROTOCOL_VERSION, kw_only=True)

    @property
    def kind(self) -> str:
        return self.KIND

    def to_wire(self) -> dict:
        return {
            "v": self.version,
            "kind": self.kind,
            "stream": self.stream,
            "seq": self.seq,
            "width": self.width,
            "height": self.height,
            "ts": self.timestamps,
        }

    @classmethod
    def from_wire(cls, wire: dict, envelope: dict, payloads: list) -> Message:
        """The message from the checked ``envelope`` (keyword arguments of the common fields),
        the kind's own fields in ``wire`` and the ``payloads``; raises :class:`Rejected`."""
        raise NotImplementedError


@dataclass
class Frame(Message):
    """A captured frame: its one payload is the image, JPEG or raw BGR."""

    KIND: ClassVar[str] = KIND_FRAME
    PAYLOADS: ClassVar[int | None] = 1

    encoding: str = ENCODING_JPEG
    flow: bool = False  # the sender waits for each result (never superseded)
    detect: dict[str, int] = field(default_factory=dict)  # the camera's detector settings

    def to_wire(self) -> dict:
        wire = {**super().to_wire(), "encoding": self.encoding}
        if self.flow:
            wire["flow"] = True
        if self.detect:
            wire["detect"] = self.detect
        return wire

    @classmethod
    def from_wire(cls, wire: dict, envelope: dict, payloads: list) -> Frame:
        flow = _flow(wire)
        encoding = _field(wire, "encoding", str)
        if encoding not in ENCODINGS:
            raise Rejected("encoding", f"unknown image encoding {encoding!r}")
        _count_payloads(cls.KIND, payloads, 1)
        width, height = envelope["width"], envelope["height"]
        size = _payload_len(payloads[0])
        if encoding == ENCODING_BGR and size != width * height * 3:
            raise Rejected("size", f"raw payload of {size} bytes for {width}x{height}x3")
        if size == 0 or size > MAX_PAYLOAD_BYTES:
            raise Rejected("size", f"payload of {size} bytes")
        detect = detect_settings(wire["detect"]) if "detect" in wire else {}
        return cls(**envelope, encoding=encoding, flow=flow, detect=detect)


@dataclass
class Faces(Message):
    """The faces found in a frame: one box each, and one raw crop per box as payloads."""

    KIND: ClassVar[str] = KIND_FACES
    PAYLOADS: ClassVar[int | None] = None

    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, w, h
    crop_size: int = 0  # each crop is crop_size^2 BGR
    flow: bool = False  # copied from the frame
    # per box, its landmarks (x, y) in frame pixels (BlazeFace: KEYPOINTS); None: not given
    keypoints: list[list[tuple[int, int]]] | None = None

    def to_wire(self) -> dict:
        wire = super().to_wire()
        if self.flow:
            wire["flow"] = True
        if self.keypoints is not None:
            wire["keypoints"] = [[list(p) for p in points] for points in self.keypoints]
        return {**wire, "boxes": [list(b) for b in self.boxes], "crop_size": self.crop_size}

    @classmethod
    def from_wire(cls, wire: dict, envelope: dict, payloads: list) -> Faces:
        flow = _flow(wire)
        boxes = _boxes(wire, envelope["width"], envelope["height"])
        crop_size = _field(wire, "crop_size", int)
        if not 8 <= crop_size <= MAX_CROP_SIZE:
            raise Rejected("dimensions", f"crop size {crop_size} outside 8..{MAX_CROP_SIZE}")
        if len(payloads) != len(boxes):
            raise Rejected("frames", f"{len(payloads)} crops for {len(boxes)} boxes")
        want = crop_size * crop_size * 3
        for part in payloads:
            if _payload_len(part) != want:
                raise Rejected("size", f"crop of {_payload_len(part)} bytes, expected {want}")
        keypoints = _keypoints(wire, len(boxes), envelope["width"], envelope["height"])
        return cls(**envelope, boxes=boxes, crop_size=crop_size, flow=flow, keypoints=keypoints)


@dataclass
class Result(Message):
    """The classifier's answer for a frame: one :class:`FaceResult` per box."""

    KIND: ClassVar[str] = KIND_RESULT

    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, w, h
    results: Sequence[FaceResult] = field(default_factory=list)  # TrackedFace in Tracks
    model: str = ""  # the model version that answered

    def to_wire(self) -> dict:
        return {
            **super().to_wire(),
            "boxes": [list(b) for b in self.boxes],
            "results": [r.to_wire() for r in self.results],
            "model": self.model,
        }

    @classmethod
    def from_wire(cls, wire: dict, envelope: dict, payloads: list) -> Result:
        _count_payloads(cls.KIND, payloads, 0)
        width, height = envelope["width"], envelope["height"]
        boxes = _boxes(wire, width, height)
        model = _field(wire, "model", str)
        results = _field(wire, "results", list)
        if len(results) != len(boxes):
            raise Rejected("field", f"{len(results)} results for {len(boxes)} boxes")
        faces = [cls._face(item, width, height) for item in results]
        return cls(**envelope, boxes=boxes, results=faces, model=model)

    @classmethod
    def _face(cls, item, width: int, height: int) -> FaceResult:
        if not isinstance(item, dict):
            raise Rejected("field", "result entry is not a map")
        return FaceResult(
            box=_box(_field(item, "box", list), width, height),
            label=_emotion(_field(item, "label", str), "label"),
            confidence=_finite(_field(item, "confidence", (int, float)), "confidence"),
            scores=_scores(_field(item, "scores", list), "scores"),
        )


@dataclass
class Tracks(Result):
    """The tracker's view of a result: the same faces as :class:`TrackedFace`."""

    KIND: ClassVar[str] = KIND_TRACKS

    results: Sequence[TrackedFace] = field(default_factory=list)

    @classmethod
    def _face(cls, item, width: int, height: int) -> TrackedFace:
        return _tracked_face(super()._face(item, width, height), item)


@dataclass
class Event(Message):
    """Something that happened to a track, at the frame of the envelope."""

    KIND: ClassVar[str] = KIND_EVENT

    event: TrackEvent = field(kw_only=True)

    def to_wire(self) -> dict:
        return {**super().to_wire(), "event": self.event.to_wire()}

    @classmethod
    def from_wire(cls, wire: dict, envelope: dict, payloads: list) -> Event:
        _count_payloads(cls.KIND, payloads, 0)
        return cls(**envelope, event=_event(_field(wire, "event", dict)))


# The kinds of message, and the class that decodes and validates each.
MESSAGE_TYPES: dict[str, type[Message]] = {
    KIND_FRAME: Frame,
    KIND_FACES: Faces,
    KIND_RESULT: Result,
    KIND_TRACKS: Tracks,
    KIND_EVENT: Event,
}
KINDS = tuple(MESSAGE_TYPES)

M = TypeVar("M", bound=Message)


def encode(message: Message, payloads: Sequence = ()) -> list:
    """Build the multipart message; payloads (bytes, memoryview, ndarray) are not copied."""
    packed = msgpack.packb(message.to_wire(), use_bin_type=True)
    return [message.stream.encode("utf-8"), packed, *payloads]


def _field(wire: dict, name: str, types, *, optional=False, default=None):
    if name not in wire:
        if optional:
            return default
        raise Rejected("field", f"missing field {name!r}")
    value = wire[name]
    if isinstance(value, bool) or not isinstance(value, types):
        raise Rejected("field", f"field {name!r} has type {type(value).__name__}")
    return value


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Rejected("field", f"field {name!r} is not a finite number")
    return float(value)


def _box(value, width: int, height: int) -> tuple[int, int, int, int]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise Rejected("field", f"box {value!r} is not four integers")
    x, y, w, h = value
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise Rejected("dimensions", f"box {value!r} lies outside the {width}x{height} frame")
    return (x, y, w, h)


def _boxes(wire: dict, width: int, height: int) -> list[tuple[int, int, int, int]]:
    boxes = _field(wire, "boxes", list)
    if len(boxes) > MAX_FACES:
        raise Rejected("dimensions", f"{len(boxes)} faces, at most {MAX_FACES}")
    return [_box(b, width, height) for b in boxes]


def _keypoints(wire: dict, faces: int, width: int, height: int) -> list[list[tuple[int, int]]] | None:
    """The optional ``keypoints`` of a faces message: per box, at most MAX_KEYPOINTS points
    [x, y], integers inside the frame."""
    keypoints = _field(wire, "keypoints", list, optional=True)
    if keypoints is None:
        return None
    if len(keypoints) != faces:
        raise Rejected("field", f"{len(keypoints)} keypoint lists for {faces} boxes")
    out = []
    for points in keypoints:
        if not isinstance(points, list) or len(points) > MAX_KEYPOINTS:
            raise Rejected("field", f"keypoints {points!r} are not a list of at most {MAX_KEYPOINTS} points")
        face = []
        for point in points:
            if (
                not isinstance(point, list)
                or len(point) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in point)
            ):
                raise Rejected("field", f"keypoint {point!r} is not two integers")
            x, y = point
            if not (0 <= x < width and 0 <= y < height):
                raise Rejected("dimensions", f"keypoint {point!r} lies outside the {width}x{height} frame")
            face.append((x, y))
        out.append(face)
    return out


def _flow(wire: dict) -> bool:
    flow = wire.get("flow", False)
    if not isinstance(flow, bool):
        raise Rejected("field", f"field 'flow' has type {type(flow).__name__}")
    return flow


def _count_payloads(kind: str, payloads: list, expected: int) -> None:
    if len(payloads) != expected:
        raise Rejected("frames", f"{kind} message with {len(payloads)} payloads, expected {expected}")


def flow_controlled(parts: Sequence) -> bool:
    """Whether a frame or faces message says its sender waits for each result (``flow``),
    read without validating the rest: stages that supersede waiting frames must not drop
    these, or the sender waits in vain. False for anything unreadable."""
    try:
        raw = parts[1].buffer if hasattr(parts[1], "buffer") else parts[1]
        if _payload_len(raw) > MAX_HEADER_BYTES:
            return False
        wire = msgpack.unpackb(
            raw, raw=False, max_map_len=64, max_array_len=4 * MAX_FACES + 64, max_str_len=4096, max_bin_len=0
        )
        return isinstance(wire, dict) and wire.get("flow") is True
    except Exception:  # msgpack raises several unrelated types for bad input
        return False


def _payload_len(part) -> int:
    if isinstance(part, (bytes, bytearray)):
        return len(part)
    return memoryview(part).nbytes


def decode(
    parts: Sequence,
    expect_kind: str | None = None,
    *,
    max_skew_s: float = MAX_CLOCK_SKEW_S,
    now: float | None = None,
) -> tuple[Message, list]:
    """Validate a received multipart message and return it, as its kind's class, and its
    payloads.

    ``parts`` may be bytes or zmq.Frame objects. A timestamp more than ``max_skew_s``
    ahead of ``now`` (default: this machine's clock; 0 = no check) is refused with reason
    ``clock``. Raises :class:`Rejected`.
    """
    parts = [p.buffer if hasattr(p, "buffer") else p for p in parts]
    if len(parts) < 2:
        raise Rejected("frames", f"{len(parts)} frames, need at least topic and header")
    wire = _header(parts[1])
    kind, envelope = _envelope(wire, expect_kind, max_skew_s, now)
    payloads = list(parts[2:])
    return MESSAGE_TYPES[kind].from_wire(wire, envelope, payloads), payloads


def decode_as(
    parts: Sequence, kind: type[M], *, max_skew_s: float = MAX_CLOCK_SKEW_S, now: float | None = None
) -> tuple[M, list]:
    """:func:`decode` of a message that must be of one kind, typed as that kind's class."""
    message, payloads = decode(parts, kind.KIND, max_skew_s=max_skew_s, now=now)
    return cast(M, message), payloads


def _header(raw) -> dict:
    if _payload_len(raw) > MAX_HEADER_BYTES:
        raise Rejected("header", f"header of {_payload_len(raw)} bytes is too large")
    try:
        wire = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_array_len=4 * MAX_FACES + 64,
            max_map_len=64,
            max_str_len=4096,
            max_bin_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise Rejected("header", f"undecodable msgpack ({type(exc).__name__})") from None
    if not isinstance(wire, dict):
        raise Rejected("header", f"header is a {type(wire).__name__}, not a map")
    return wire


def _envelope(wire: dict, expect_kind: str | None, max_skew_s: float, now: float | None) -> tuple[str, dict]:
    """The kind and the checked common fields (as keyword arguments of :class:`Message`)."""
    version = _field(wire, "v", int)
    if version != PROTOCOL_VERSION:
        raise Rejected("version", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    kind = _field(wire, "kind", str)
    if kind not in MESSAGE_TYPES or (expect_kind is not None and kind != expect_kind):
        raise Rejected("kind", f"message kind {kind!r} where {expect_kind or KINDS} expected")
    stream = _field(wire, "stream", str)
    if not stream or len(stream) > MAX_STREAM_ID:
        raise Rejected("field", "stream id is empty or longer than 128 characters")
    seq = _field(wire, "seq", int)
    width = _field(wire, "width", int)
    height = _field(wire, "height", int)
    if seq < 0:
        raise Rejected("field", f"negative sequence number {seq}")
    if not (0 < width <= MAX_DIMENSION and 0 < height <= MAX_DIMENSION):
        raise Rejected("dimensions", f"frame size {width}x{height} outside 1..{MAX_DIMENSION}")
    ts = _field(wire, "ts", dict)
    if len(ts) > 16 or not all(isinstance(k, str) for k in ts):
        raise Rejected("field", "timestamps must map stage names to times")
    timestamps = {k: _finite(v, f"ts.{k}") for k, v in ts.items()}
    check_clock(timestamps, max_skew_s, now)
    return kind, dict(stream=stream, seq=seq, width=width, height=height, timestamps=timestamps)


def _emotion(value: str, name: str) -> str:
    if value not in EMOTIONS:
        raise Rejected("field", f"field {name!r}: {value[:32]!r} is not one of {', '.join(EMOTIONS)}")
    return value


def _scores(values: list, name: str) -> list[float]:
    if len(values) != len(EMOTIONS):
        raise Rejected("field", f"field {name!r} has {len(values)} numbers, expected {len(EMOTIONS)}")
    return [_finite(v, name) for v in values]


def _track_id(value) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TRACK_ID:
        raise Rejected(
            "field", f"track id {str(value)[:40]!r} is not a string of 1 to {MAX_TRACK_ID} characters"
        )
    return value


def _tracked_face(face: FaceResult, item: dict) -> TrackedFace:
    age = _finite(_field(item, "age_s", (int, float)), "age_s")
    if age < 0:
        raise Rejected("field", f"negative track age {age}")
    if "track" not in item:
        raise Rejected("field", "missing field 'track'")
    return TrackedFace(
        box=face.box,
        label=face.label,
        confidence=face.confidence,
        scores=face.scores,
        track=None if item["track"] is None else _track_id(item["track"]),
        smoothed_label=_emotion(_field(item, "smoothed_label", str), "smoothed_label"),
        smoothed_scores=_scores(_field(item, "smoothed_scores", list), "smoothed_scores"),
        age_s=age,
    )


def _event(wire: dict) -> TrackEvent:
    name = _field(wire, "name", str)
    if name not in EVENTS:
        raise Rejected("field", f"event {name[:32]!r} is not one of {', '.join(EVENTS)}")
    event = TrackEvent(
        name=name,
        track=_track_id(_field(wire, "track", str)),
        time=_finite(_field(wire, "time", (int, float)), "time"),
        label=_emotion(_field(wire, "label", str), "label"),
    )
    if name == "emotion_changed":
        event.previous = _emotion(_field(wire, "previous", str), "previous")
    if name == "track_ended":
        summary = _field(wire, "summary", dict)
        frames = _field(summary, "frames", int)
        if frames < 0:
            raise Rejected("field", f"negative frame count {frames}")
        event.summary = TrackSummary(
            start=_finite(_field(summary, "start", (int, float)), "summary.start"),
            end=_finite(_field(summary, "end", (int, float)), "summary.end"),
            frames=frames,
            dominant=_emotion(_field(summary, "dominant", str), "summary.dominant"),
            mean_scores=_scores(_field(summary, "mean_scores", list), "summary.mean_scores"),
            shares=_scores(_field(summary, "shares", list), "summary.shares"),
        )
    return event


def check_clock(
    timestamps: dict[str, float], max_skew_s: float = MAX_CLOCK_SKEW_S, now: float | None = None
) -> None:
    """Refuse timestamps from the future: one would hold a stream's order (everything
    real looks older) and escape every age limit until the clock catches up."""
    if not max_skew_s or not timestamps:
        return
    now = time.time() if now is None else now
    stage, newest = max(timestamps.items(), key=lambda item: item[1])
    if newest > now + max_skew_s:
        raise Rejected(
            "clock",
            f"ts.{stage[:32]} is {newest - now:.3f} s in the future (at most {max_skew_s:g} s accepted)",
        )


def jpeg_size(data) -> tuple[int, int] | None:
    """Width and height from a JPEG's SOF marker, read without decoding the image."""
    buf = memoryview(data)
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", buf[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", buf[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


def decode_image(header: Frame, payload, max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """Turn a frame payload into a BGR image, checking its size against the header first.

    Decompression bombs are refused before anything is allocated: a frame of more than
    ``max_pixels`` pixels (0 = only the protocol's 8192x8192), a JPEG whose own size (read
    from its SOF marker) differs from the header's, and a JPEG claiming more than
    ``MAX_PIXELS_PER_BYTE`` pixels per byte of file, which no real encoder produces.
    """
    import cv2

    check_image(header, payload, max_pixels)
    if header.encoding == ENCODING_BGR:
        return np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)
    # The pixels as stored: an EXIF orientation would swap the header's width and height
    # (capture never writes one), and looking for it costs a quarter of the decoding time.
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None or image.shape[:2] != (header.height, header.width):
        raise Rejected("image", "JPEG could not be decoded")
    return image


def check_image(header: Frame, payload, max_pixels: int = MAX_FRAME_PIXELS) -> None:
    """The checks of :func:`decode_image` that need no decoding (Rejected if one fails)."""
    pixels = header.width * header.height
    if max_pixels and pixels > max_pixels:
        raise Rejected(
            "dimensions",
            f"frame of {header.width}x{header.height} = {pixels} pixels, at most {max_pixels} accepted",
        )
    if header.encoding == ENCODING_BGR:
        return
    size = jpeg_size(payload)
    if size is None:
        raise Rejected("image", "payload is not a JPEG")
    if size != (header.width, header.height):
        raise Rejected("size", f"JPEG is {size[0]}x{size[1]}, header says {header.width}x{header.height}")
    length = _payload_len(payload)
    if pixels > MAX_PIXELS_PER_BYTE * length:
        raise Rejected(
            "size",
            f"JPEG of {length} bytes claims {pixels} pixels (more than "
            f"{MAX_PIXELS_PER_BYTE} per byte: a decompression bomb)",
        )


def decode_crops(header: Faces, payloads: list) -> np.ndarray:
    """Stack the raw crops of a faces message into an (N, S, S, 3) uint8 array."""
    s = header.crop_size
    if not payloads:
        return np.zeros((0, s, s, 3), np.uint8)
    return np.stack([np.frombuffer(p, np.uint8).reshape(s, s, 3) for p in payloads])
