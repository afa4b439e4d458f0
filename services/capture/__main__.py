"""Capture: reads a source and publishes its frames to the broker.

Each frame goes to two channels: ``frames`` (fan-out, for viewers) and ``detect``
(the detectors' work queue). Sends never block: when the detect queue is full the
frame is dropped there and counted, so a slow pipeline never makes capture fall
behind the source.

A file or folder is not live: it can wait. Before its first frame, capture sends that
frame to the detectors until a result for it comes back (``--wait-ready-s``), so a short
clip is not over before the classifier has loaded its model. Live sources start at once.

A file or folder read as fast as possible (``--no-pace``) is flow-controlled: capture
reads, encodes and sends its next frame only while fewer than ``--max-in-flight`` frames
are waiting for their results, so it never makes a frame a detector would supersede.
Live and paced sources keep every frame for the viewers and let the detectors skip.
"""
from __future__ import annotations

import signal
import threading
import time

import zmq
from prometheus_client import Counter, Gauge

from services.common import bus
from services.common.config import config_error, service_parser, setup_logging
from services.common.flow import Ledger, answers
from services.common.metrics import drop, serve_metrics
from services.common.protocol import (ENCODING_BGR, ENCODING_JPEG, KIND_RESULT, Rejected, decode)

from .frames import encode_frame, publish_every
from .sources import DEFAULT_TIMEOUT_MS, Backoff, Pacer, SourceError, fit_width, open_source

FRAMES = Counter("emotion_capture_frames_total", "Frames published", ["stream"])
SOURCE_UP = Gauge("emotion_capture_source_up", "1 while the source delivers frames", ["stream"])
SOURCE_FINISHED = Gauge("emotion_capture_source_finished",
                        "1 once a file or folder source has ended", ["stream"])
UNANSWERED = Counter("emotion_capture_unanswered_total",
                     "Frames sent under flow control that got no result within "
                     "--in-flight-timeout-ms (lost on the way; not sent again)", ["stream"])
SOURCE_RETRIES = Counter("emotion_capture_source_retries_total",
                         "Attempts to reopen a failed camera or URL", ["stream"])


def build_parser():
    parser = service_parser("capture", __doc__.splitlines()[0], metrics_port=9101)
    parser.option("--source", default="demo",
                  help="'demo', a camera index (0) or /dev/videoN, a video file, an "
                       "rtsp:// or http(s):// URL, an image folder, or a glob like 'pics/*.jpg'")
    parser.option("--stream", default="main", help="stream id carried by every frame")
    parser.option("--fps", default=0.0, type=float,
                  help="frames per second to publish (0 = the source's own rate; "
                       "15 for demo, image folders and cameras that do not say)")
    parser.option("--pace", default=True, type=bool,
                  help="pace files at their frame rate; --no-pace reads as fast as possible")
    parser.option("--max-width", default=640, type=int,
                  help="downscale wider frames to this width (0 = never)")
    parser.option("--encoding", default=ENCODING_JPEG, choices=[ENCODING_JPEG, ENCODING_BGR],
                  help="how frames travel: jpeg, or raw bgr (more bandwidth, less CPU)")
    parser.option("--jpeg-quality", default=85, type=int, help="JPEG quality 1-100")
    parser.option("--loop", default=False, type=bool, help="restart file sources at their end")
    parser.option("--exit-at-end", default=False, type=bool,
                  help="exit when a file source ends (batch use) instead of idling")
    parser.option("--source-timeout-ms", default=DEFAULT_TIMEOUT_MS, type=int,
                  help="URL sources: longest opening or reading may block before the source "
                       "counts as down and is reopened with backoff (0 = OpenCV's default, 30 s)")
    parser.option("--max-frames", default=0, type=int, help="stop after this many frames (0 = no limit)")
    parser.option("--max-in-flight", default=4, type=int,
                  help="unpaced files and folders (--no-pace): read, encode and send a frame "
                       "only while fewer than this many are in the pipeline, so none is made "
                       "just to be superseded (0 = no flow control); more keeps more replicas busy")
    parser.option("--in-flight-timeout-ms", default=1000.0, type=float,
                  help="a frame with no result after this long no longer counts as in flight")
    parser.option("--wait-ready-s", default=120.0, type=float,
                  help="files and folders: before the first frame, wait up to this long for a "
                       "detector and a classifier to answer it (0 = start at once)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def wait_until_answered(ctx: zmq.Context, addr: bus.BrokerAddress, detect_out: zmq.Socket,
                        probe, stream: str, timeout_s: float, stop: threading.Event,
                        log) -> bool:
    """Send the first frame (seq 0, made anew by ``probe()`` so it is never too old for the
    stages) to the detectors until its result comes back, each second in case the stages
    were not connected yet; False after ``timeout_s``."""
    results = bus.consumer(ctx, addr, "results", topic=stream.encode())
    started = time.monotonic()
    next_notice = started
    try:
        while not stop.is_set():
            now = time.monotonic()
            if now - started > timeout_s:
                log.warning("no detector and classifier answered within %.0f s; starting anyway",
                            timeout_s)
                return False
            if now >= next_notice:
                log.info("waiting for a detector and a classifier to answer before reading "
                         "stream %r (--wait-ready-s %.0f)", stream, timeout_s)
                next_notice = now + 10.0
            bus.send_nowait(detect_out, probe())
            if results.poll(1000):
                try:
                    header, _ = decode(results.recv_multipart(), expect_kind=KIND_RESULT)
                except Rejected:
                    continue
                if header.stream == stream and header.seq == 0:
                    log.info("the pipeline answered after %.1f s", time.monotonic() - started)
                    return True
        return False
    finally:
        results.close()


def wait_for_room(ledger: Ledger, results: zmq.Socket, stream: str, stop: threading.Event,
                  log) -> None:
    """Take the stream's results as they come and return once fewer than the window's
    frames are in flight (or at stop). A frame unanswered for the ledger's resend time was
    lost on the way (a full queue, a replica stopping) and stops counting."""
    while not stop.is_set():
        for header in answers(results, stream, log):
            ledger.answer(header.seq)
        ledger.due_again(time.monotonic())
        if ledger.given_up:
            UNANSWERED.labels(stream).inc(len(ledger.given_up))
            ledger.given_up.clear()
        if ledger.room():
            return
        results.poll(20)


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging("capture", args.log_level)
    try:
        source = open_source(args.source, args.source_timeout_ms)
    except SourceError as exc:
        config_error("capture", str(exc))
    serve_metrics(args.metrics_port, args.metrics_host)
    addr = bus.client_address("capture", args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    frames_out = bus.producer(ctx, addr, "frames")
    detect_out = bus.producer(ctx, addr, "detect")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stream = args.stream
    SOURCE_UP.labels(stream).set(0)
    SOURCE_FINISHED.labels(stream).set(0)
    backoff = Backoff()
    seq = 0
    flow = None              # (ledger, results subscriber) for unpaced files and folders
    try:
        while not stop.is_set():
            try:
                source.open()
            except SourceError as exc:
                SOURCE_UP.labels(stream).set(0)
                if not source.live:
                    config_error("capture", str(exc))
                delay = backoff.next()
                SOURCE_RETRIES.labels(stream).inc()
                log.warning("%s; retrying in %.1f s", exc, delay)
                stop.wait(delay)
                continue
            SOURCE_UP.labels(stream).set(1)
            SOURCE_FINISHED.labels(stream).set(0)
            native = source.native_fps
            is_file = not source.live and native > 0 and source.name != "demo"
            fps = args.fps or native or 15.0
            # Files are paced at their own rate (skipping frames for a lower --fps); cameras
            # and URLs deliver at theirs, so only a lower --fps throttles them; demo and
            # image folders are paced at --fps.
            if source.live:
                pacer = Pacer(0.0)
            else:
                pacer = Pacer((native if is_file else fps) if args.pace else 0.0)
            every = publish_every(native, args.fps) if is_file else 1.0
            waits = not source.live and source.name != "demo"
            min_interval = 1.0 / args.fps if source.live and args.fps else 0.0
            last_publish = 0.0
            log.info("reading %s (%.1f fps native), publishing stream %r at %s", source.name,
                     native, stream, f"{fps:.1f} fps" if args.pace else "full speed")
            read_index = 0
            next_publish = 0.0
            if flow is None and not source.live and not args.pace and args.max_in_flight > 0:
                flow = (Ledger(args.max_in_flight, args.in_flight_timeout_ms / 1000.0, attempts=1),
                        bus.consumer(ctx, addr, "results", topic=stream.encode()))
                log.info("flow control: at most %d frames in the pipeline", args.max_in_flight)
            while not stop.is_set():
                if flow and seq:
                    wait_for_room(*flow, stream, stop, log)
                frame = source.read()
                if frame is None:
                    break
                pacer.wait()
                backoff.reset()
                read_index += 1
                if read_index - 1 < next_publish:
                    continue
                next_publish += every
                if min_interval:
                    now = time.monotonic()
                    if now - last_publish < min_interval:
                        continue
                    last_publish = now
                small = fit_width(frame, args.max_width, args.max_frame_pixels)
                answered = False
                if seq == 0 and waits and args.wait_ready_s > 0:
                    answered = wait_until_answered(
                        ctx, addr, detect_out,
                        lambda: encode_frame(small, stream, 0, args.encoding, args.jpeg_quality),
                        stream, args.wait_ready_s, stop, log)
                parts = encode_frame(small, stream, seq, args.encoding, args.jpeg_quality,
                                     flow=flow is not None)
                frames_out.send_multipart(parts, copy=False)   # PUB: never blocks
                if not answered and not bus.send_nowait(detect_out, parts):
                    drop("capture", "detect_queue_full")
                elif flow and not answered:
                    flow[0].sent(seq, [], time.monotonic())
                FRAMES.labels(stream).inc()
                seq += 1
                if args.max_frames and seq >= args.max_frames:
                    stop.set()
            source.close()
            SOURCE_UP.labels(stream).set(0)
            if stop.is_set():
                break
            if source.live:
                delay = backoff.next()
                SOURCE_RETRIES.labels(stream).inc()
                log.warning("%s stopped delivering frames; reopening in %.1f s", source.name, delay)
                stop.wait(delay)
            elif args.loop:
                continue
            else:
                SOURCE_FINISHED.labels(stream).set(1)
                log.info("%s finished after %d frames", source.name, seq)
                if args.exit_at_end:
                    break
                stop.wait()   # stay up so metrics and the rest of the pipeline stay up
    finally:
        # Give the last frames a moment to leave before the sockets close.
        time.sleep(0.2 if args.exit_at_end or args.max_frames else 0)
        frames_out.close()
        detect_out.close()
        if flow:
            flow[1].close()
        ctx.term()
        log.info("stopped after %d frames", seq)


if __name__ == "__main__":
    main()
