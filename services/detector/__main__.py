"""Detector: pulls frames from the detect queue, finds faces, pushes crops to classify.

One message goes out per frame, also for frames with no face, so downstream stages
(and the viewer) learn that the frame was seen and can clear old labels.
"""
from __future__ import annotations

import itertools
import signal
import threading
import time

import zmq
from prometheus_client import Counter, Histogram

from services.common import bus
from services.common.config import service_parser, setup_logging
from services.common.metrics import RejectLog, drop, serve_metrics
from services.common.protocol import (JOB_PREFIX, KIND_FRAME, MAX_FRAME_PIXELS, Faces, Frame,
                                      Rejected, decode, decode_image, encode, flow_controlled,
                                      is_job)

from .faces import DetectorSettings, crop_faces, load_cascade
from .regions import FULL, REGION, RESCAN, FaceFinder, RegionSettings

JOB_TOPIC = JOB_PREFIX.encode()
FRAMES = Counter("emotion_detector_frames_total", "Frames run through face detection")
FACES = Counter("emotion_detector_faces_total", "Faces found")
FRAMES_WITH_FACES = Counter("emotion_detector_frames_with_faces_total",
                            "Frames in which at least one face was found")
SCANS = Counter("emotion_detector_scans_total",
                "Frames by how faces were searched: region (around known faces only), full "
                "(regions plus the rest of the frame) or rescan (a region lost its face)",
                ["kind"])
SECONDS = Histogram("emotion_detector_seconds", "Time to decode, detect and crop one frame",
                    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0))


def build_parser():
    parser = service_parser("detector", __doc__.splitlines()[0], metrics_port=9102)
    d = DetectorSettings()
    parser.option("--cascade", default="haarcascade_frontalface_default.xml",
                  help="Haar cascade file name in cv2.data.haarcascades, or a path")
    parser.option("--scale-factor", default=d.scale_factor, type=float, help="Haar scaleFactor")
    parser.option("--min-neighbors", default=d.min_neighbors, type=int, help="Haar minNeighbors")
    parser.option("--min-size", default=d.min_size, type=int,
                  help="smallest face side, in full-resolution pixels")
    parser.option("--detect-width", default=d.detect_width, type=int,
                  help="detect on a copy downscaled to this width (0 = full resolution)")
    parser.option("--margin", default=d.margin, type=float,
                  help="margin added around each face crop, as a fraction of the box")
    parser.option("--crop-size", default=d.crop_size, type=int, help="side of the face crops sent on")
    parser.option("--equalize", default=d.equalize, type=bool,
                  help="equalise the grey histogram before detection (for dim scenes)")
    r = RegionSettings()
    parser.option("--full-scan-every", default=r.full_scan_every, type=int,
                  help="scan the whole frame every this many frames of a stream and only "
                       "regions around known faces in between (1 = always the whole frame)")
    parser.option("--full-scan-ms", default=r.full_scan_ms, type=float,
                  help="...and at least this often, in capture time (a new face is found "
                       "within about this long)")
    parser.option("--region-grow", default=r.grow, type=float,
                  help="a region is its face grown by this fraction of its side on each side")
    parser.option("--region-face-px", default=r.face_px, type=int,
                  help="regions are scanned shrunk so that their face is this many pixels wide")
    parser.option("--max-age-ms", default=500.0, type=float,
                  help="drop frames captured longer ago than this (0 = never)")
    parser.option("--newest-only", default=True, type=bool,
                  help="work on the newest waiting frame of each stream and drop older ones "
                       "(reason superseded); --no-newest-only takes every frame in order")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def faces_message(header: Frame, payload, finder: FaceFinder,
                  max_pixels: int = MAX_FRAME_PIXELS) -> list:
    """A decoded frame message in, a faces message out (Rejected if the image is bad)."""
    settings = finder.settings
    image = decode_image(header, payload, max_pixels)
    boxes, how = finder.find(header.stream, header.seq,
                             header.timestamps.get("capture", time.time()), image)
    SCANS.labels(how).inc()
    crops = crop_faces(image, boxes, settings.margin, settings.crop_size)
    out = Faces(stream=header.stream, seq=header.seq, width=header.width,
                height=header.height, timestamps={**header.timestamps, "detect": time.time()},
                boxes=boxes, crop_size=settings.crop_size, flow=header.flow)
    return encode(out, list(crops))


class NewestFrames:
    """Receives frames as they come and keeps only the newest waiting frame of each stream.

    A detector slower than its source then works on the newest frame, and older ones are
    dropped here (reason ``superseded``). Without this they wait in the queue's socket
    buffers, which hold hundreds of frames: under overload every frame would reach the
    detector almost --max-age-ms old and then go stale before its result is out.
    Frames of jobs (stream ids starting ``job:``) and frames marked ``flow`` are never
    superseded: they all wait, in arrival order, since their sender already limits how many
    are in flight and waits for each result.
    """

    MAX_STREAMS = 64

    def __init__(self, sock: zmq.Socket, stop: threading.Event):
        self._sock, self._stop = sock, stop
        self._waiting: dict[bytes, list] = {}     # topic -> parts, oldest arrival first
        self._ready = threading.Condition()
        self._arrivals = itertools.count()
        self.thread = threading.Thread(target=self._run, name="newest-frames", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(200):
                continue
            parts = self._sock.recv_multipart(copy=False)
            topic = parts[0].bytes[:256]
            if topic.startswith(JOB_TOPIC) or flow_controlled(parts):
                topic = (topic, next(self._arrivals))    # a key of its own: kept, not replaced
            with self._ready:
                if self._waiting.pop(topic, None) is not None:
                    drop("detector", "superseded")
                elif len(self._waiting) >= self.MAX_STREAMS:
                    self._waiting.pop(next(iter(self._waiting)))
                    drop("detector", "superseded")
                self._waiting[topic] = parts
                self._ready.notify()

    def take(self, timeout: float) -> list | None:
        """The oldest stream's newest frame, or None after ``timeout`` seconds without one."""
        with self._ready:
            if not self._waiting:
                self._ready.wait(timeout)
            if not self._waiting:
                return None
            return self._waiting.pop(next(iter(self._waiting)))


def in_order(sock: zmq.Socket):
    """--no-newest-only: every frame, in arrival order."""
    def take(timeout: float) -> list | None:
        return sock.recv_multipart(copy=False) if sock.poll(int(timeout * 1000)) else None
    return take


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging("detector", args.log_level)
    settings = DetectorSettings(args.scale_factor, args.min_neighbors, args.min_size,
                                args.detect_width, args.margin, args.crop_size, args.equalize)
    regions = RegionSettings(args.full_scan_every, args.full_scan_ms, args.region_grow,
                             face_px=args.region_face_px)
    finder = FaceFinder(load_cascade(args.cascade), settings, regions)
    for kind in (FULL, REGION, RESCAN):
        SCANS.labels(kind)
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.client_address("detector", args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    frames_in = bus.consumer(ctx, addr, "detect", max_pixels=args.max_frame_pixels)
    faces_out = bus.producer(ctx, addr, "classify")
    rejected = RejectLog("detector", log)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    max_age = args.max_age_ms / 1000.0
    max_skew = args.max_clock_skew_ms / 1000.0
    log.info("detecting faces (%s, %s), max frame age %.0f ms", settings, regions,
             args.max_age_ms)
    newest = NewestFrames(frames_in, stop) if args.newest_only else None
    take = newest.take if newest else in_order(frames_in)
    while not stop.is_set():
        parts = take(0.2)
        if parts is None:
            continue
        started = time.perf_counter()
        try:
            header, payloads = decode(parts, expect_kind=KIND_FRAME, max_skew_s=max_skew)
            if max_age and not is_job(header.stream) and bus.age_seconds(header.timestamps) > max_age:
                drop("detector", "stale")
                continue
            out = faces_message(header, payloads[0], finder, args.max_frame_pixels)
        except Rejected as exc:
            rejected(exc)
            continue
        SECONDS.observe(time.perf_counter() - started)
        FRAMES.inc()
        faces = len(out) - 2   # topic, header, then one crop per face
        FACES.inc(faces)
        if faces:
            FRAMES_WITH_FACES.inc()
        if not bus.send_nowait(faces_out, out):
            drop("detector", "classify_queue_full")
    if newest:
        newest.thread.join(2)
    frames_in.close()
    faces_out.close()
    ctx.term()


if __name__ == "__main__":
    main()
