"""The wire protocol every service speaks (documented in docs/protocol.md).

A message is a ZeroMQ multipart message:

    [topic, header, payload_0, payload_1, ...]

* ``topic``   -- the stream id as UTF-8 (lets subscribers filter by stream).
* ``header``  -- a msgpack map (never pickle) described by :class:`Header`.
* ``payload`` -- raw bytes kept out of msgpack so images are never copied into it:
  one encoded frame for ``frame`` messages, one raw crop per face for ``faces``
  messages, nothing for ``result`` messages.

Every receiver calls :func:`decode`, which validates everything it can before any
image is decoded and raises :class:`Rejected` with a short, stable ``reason``
(used as a metric label) for anything it does not accept.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Sequence

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

KIND_FRAME = "frame"      # capture -> frames, detect
KIND_FACES = "faces"      # detector -> classify
KIND_RESULT = "result"    # classifier -> results
KINDS = (KIND_FRAME, KIND_FACES, KIND_RESULT)

ENCODING_JPEG = "jpeg"
ENCODING_BGR = "bgr"
ENCODINGS = (ENCODING_JPEG, ENCODING_BGR)

EMOTIONS = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")

MAX_HEADER_BYTES = 256 * 1024
MAX_DIMENSION = 8192           # pixels per side of a frame
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
MAX_FACES = 256
MAX_CROP_SIZE = 512
MAX_STREAM_ID = 128


class Rejected(ValueError):
    """A message that is not accepted; ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class FaceResult:
    """One classified face: its box in frame pixels and the model's 7 scores."""

    box: tuple[int, int, int, int]
    label: str
    confidence: float
    scores: list[float]

    def to_wire(self) -> dict:
        return {"box": list(self.box), "label": self.label,
                "confidence": self.confidence, "scores": list(self.scores)}


@dataclass
class Header:
    """Everything about a message except the pixel payloads."""

    kind: str
    stream: str
    seq: int
    width: int                       # size of the original frame
    height: int
    timestamps: dict[str, float] = field(default_factory=dict)  # stage -> unix time
    encoding: str = ENCODING_JPEG    # frame payload encoding (frame messages)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # x, y, w, h
    crop_size: int = 0               # faces messages: each crop is crop_size^2 BGR
    results: list[FaceResult] = field(default_factory=list)
    model: str = ""                  # result messages: model version that answered
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict:
        wire = {"v": self.version, "kind": self.kind, "stream": self.stream, "seq": self.seq,
                "width": self.width, "height": self.height, "ts": self.timestamps}
        if self.kind == KIND_FRAME:
            wire["encoding"] = self.encoding
        if self.kind in (KIND_FACES, KIND_RESULT):
            wire["boxes"] = [list(b) for b in self.boxes]
        if self.kind == KIND_FACES:
            wire["crop_size"] = self.crop_size
        if self.kind == KIND_RESULT:
            wire["results"] = [r.to_wire() for r in self.results]
            wire["model"] = self.model
        return wire


def encode(header: Header, payloads: Sequence = ()) -> list:
    """Build the multipart message; payloads (bytes, memoryview, ndarray) are not copied."""
    packed = msgpack.packb(header.to_wire(), use_bin_type=True)
    return [header.stream.encode("utf-8"), packed, *payloads]


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
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise Rejected("field", f"box {value!r} is not four integers")
    x, y, w, h = value
    if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise Rejected("dimensions", f"box {value!r} lies outside the {width}x{height} frame")
    return (x, y, w, h)


def _payload_len(part) -> int:
    if isinstance(part, (bytes, bytearray)):
        return len(part)
    return memoryview(part).nbytes


def decode(parts: Sequence, expect_kind: str | None = None) -> tuple[Header, list]:
    """Validate a received multipart message and return its header and payloads.

    ``parts`` may be bytes or zmq.Frame objects. Raises :class:`Rejected`.
    """
    parts = [p.buffer if hasattr(p, "buffer") else p for p in parts]
    if len(parts) < 2:
        raise Rejected("frames", f"{len(parts)} frames, need at least topic and header")
    raw = parts[1]
    if _payload_len(raw) > MAX_HEADER_BYTES:
        raise Rejected("header", f"header of {_payload_len(raw)} bytes is too large")
    try:
        wire = msgpack.unpackb(raw, raw=False, strict_map_key=True,
                               max_array_len=4 * MAX_FACES + 64,
                               max_map_len=64, max_str_len=4096, max_bin_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise Rejected("header", f"undecodable msgpack ({type(exc).__name__})") from None
    if not isinstance(wire, dict):
        raise Rejected("header", f"header is a {type(wire).__name__}, not a map")
    version = _field(wire, "v", int)
    if version != PROTOCOL_VERSION:
        raise Rejected("version", f"protocol version {version}, expected {PROTOCOL_VERSION}")
    kind = _field(wire, "kind", str)
    if kind not in KINDS or (expect_kind is not None and kind != expect_kind):
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
    header = Header(kind=kind, stream=stream, seq=seq, width=width, height=height,
                    timestamps=timestamps)
    payloads = list(parts[2:])

    if kind == KIND_FRAME:
        header.encoding = _field(wire, "encoding", str)
        if header.encoding not in ENCODINGS:
            raise Rejected("encoding", f"unknown image encoding {header.encoding!r}")
        if len(payloads) != 1:
            raise Rejected("frames", f"frame message with {len(payloads)} payloads, expected 1")
        size = _payload_len(payloads[0])
        if header.encoding == ENCODING_BGR and size != width * height * 3:
            raise Rejected("size", f"raw payload of {size} bytes for {width}x{height}x3")
        if size == 0 or size > MAX_PAYLOAD_BYTES:
            raise Rejected("size", f"payload of {size} bytes")
        return header, payloads

    boxes = _field(wire, "boxes", list)
    if len(boxes) > MAX_FACES:
        raise Rejected("dimensions", f"{len(boxes)} faces, at most {MAX_FACES}")
    header.boxes = [_box(b, width, height) for b in boxes]

    if kind == KIND_FACES:
        header.crop_size = _field(wire, "crop_size", int)
        if not 8 <= header.crop_size <= MAX_CROP_SIZE:
            raise Rejected("dimensions", f"crop size {header.crop_size} outside 8..{MAX_CROP_SIZE}")
        if len(payloads) != len(header.boxes):
            raise Rejected("frames", f"{len(payloads)} crops for {len(header.boxes)} boxes")
        want = header.crop_size * header.crop_size * 3
        for part in payloads:
            if _payload_len(part) != want:
                raise Rejected("size", f"crop of {_payload_len(part)} bytes, expected {want}")
        return header, payloads

    if payloads:
        raise Rejected("frames", f"result message with {len(payloads)} payloads, expected 0")
    header.model = _field(wire, "model", str)
    results = _field(wire, "results", list)
    if len(results) != len(header.boxes):
        raise Rejected("field", f"{len(results)} results for {len(header.boxes)} boxes")
    for item in results:
        if not isinstance(item, dict):
            raise Rejected("field", "result entry is not a map")
        label = _field(item, "label", str)
        scores = _field(item, "scores", list)
        if label not in EMOTIONS or len(scores) != len(EMOTIONS):
            raise Rejected("field", f"result label {label!r} / {len(scores)} scores")
        header.results.append(FaceResult(
            box=_box(_field(item, "box", list), width, height), label=label,
            confidence=_finite(_field(item, "confidence", (int, float)), "confidence"),
            scores=[_finite(s, "scores") for s in scores]))
    return header, payloads


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
        (length,) = struct.unpack(">H", buf[i + 2:i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", buf[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def decode_image(header: Header, payload) -> np.ndarray:
    """Turn a frame payload into a BGR image, checking its size against the header first.

    JPEG dimensions are read from the file's own header before decoding, so a small
    file claiming a huge image (a decompression bomb) is refused without allocating it.
    """
    import cv2

    if header.encoding == ENCODING_BGR:
        return np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)
    size = jpeg_size(payload)
    if size is None:
        raise Rejected("image", "payload is not a JPEG")
    if size != (header.width, header.height):
        raise Rejected("size", f"JPEG is {size[0]}x{size[1]}, header says {header.width}x{header.height}")
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.shape[:2] != (header.height, header.width):
        raise Rejected("image", "JPEG could not be decoded")
    return image


def decode_crops(header: Header, payloads: list) -> np.ndarray:
    """Stack the raw crops of a faces message into an (N, S, S, 3) uint8 array."""
    s = header.crop_size
    if not payloads:
        return np.zeros((0, s, s, 3), np.uint8)
    return np.stack([np.frombuffer(p, np.uint8).reshape(s, s, 3) for p in payloads])
