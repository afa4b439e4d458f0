"""Analyze's job: every frame of a video sent to a pipeline with flow control, every
result collected in frame order, and the outputs written (see ``__main__`` for the whole
story). :class:`OwnPipeline` is the pipeline it starts when none answers.
"""

from __future__ import annotations

import logging
import socket
import sys
import time
import uuid
from pathlib import Path

import cv2
import zmq
from tqdm import tqdm

from services import launch
from services.capture.frames import encode_frame
from services.capture.sources import fit_width
from services.common import bus
from services.common.config import config_error
from services.common.flow import Ledger, answers
from services.common.ports import CHANNELS, free_base_port
from services.common.protocol import ENCODING_BGR, ENCODING_JPEG, JOB_PREFIX

from . import outputs
from .job import Collector
from .options import SERVICE

PARTIAL = 3
log = logging.getLogger(SERVICE)


def broker_answers(host: str, base_port: int) -> bool:
    """Whether a broker listens at the address (its detect port takes connections)."""
    try:
        with socket.create_connection((host, base_port + CHANNELS["detect"]), timeout=1.0):
            return True
    except OSError:
        return False


def own_plan(
    base_port: int, detectors: int = 1, classifiers: int = 1, registry: str = "models", detector: str = "haar"
) -> list[launch.ProcessSpec]:
    """The processes of analyze's own pipeline: broker, detectors (of the ``detector``
    backend) and classifiers on ``base_port``, every frame taken in order with no age limit
    (--no-newest-only, --max-age-ms 0)."""
    return launch.plan(
        ("broker", "detector", "classifier"),
        detectors=detectors,
        classifiers=classifiers,
        common=("--base-port", str(base_port), "--log-level", "WARNING"),
        args={
            "detector": ("--no-newest-only", "--max-age-ms", "0", "--detector", detector),
            "classifier": ("--max-age-ms", "0", "--registry", registry),
        },
    )


class OwnPipeline:
    """Broker, detectors and classifiers (:func:`own_plan`) as child processes, on free
    ports, for one job."""

    def __init__(
        self, detectors: int = 1, classifiers: int = 1, registry: str = "models", detector: str = "haar"
    ):
        self.base = free_base_port()
        self.addr = bus.BrokerAddress("127.0.0.1", self.base)
        self.group = launch.ProcessGroup()
        self.group.start_all(own_plan(self.base, detectors, classifiers, registry, detector))
        log.info(
            "started a pipeline of its own on base port %d: %d %s detector(s), %d classifier(s)",
            self.base,
            detectors,
            detector,
            classifiers,
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.group.processes]

    def check(self) -> None:
        self.group.check()

    def stop(self) -> None:
        self.group.stop(timeout=10)


def run_job(
    video: Path, addr: bus.BrokerAddress, args, check=lambda: None, encoding: str = ENCODING_JPEG
) -> dict:
    """Send every frame, collect every result; returns the job's rows, events and facts."""
    reader = cv2.VideoCapture(str(video))
    if not reader.isOpened():
        config_error(SERVICE, f"{video}: cannot be opened as a video")
    fps = reader.get(cv2.CAP_PROP_FPS) or 30.0
    expected = int(reader.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    stream = f"{JOB_PREFIX}{uuid.uuid4().hex[:12]}"
    ctx = zmq.Context()
    detect = bus.producer(ctx, addr, "detect")
    results = bus.consumer(ctx, addr, "results", topic=stream.encode())
    ledger = Ledger(args.in_flight, args.resend_ms / 1000, args.attempts)
    collector = Collector(fps)
    progress = tqdm(
        total=expected or None, unit="frame", disable=not args.progress, desc=video.name, dynamic_ncols=True
    )
    sent = 0
    scale = 1.0
    ended, truncated, ready, ready_at = False, "", False, None
    started = time.monotonic()
    cpu_started = time.process_time()
    next_notice = started + 5.0
    time.sleep(0.3)  # let the subscription reach the broker
    try:
        while True:
            now = time.monotonic()
            while not ended and ledger.room():
                ok, frame = reader.read()
                if not ok or frame is None:
                    ended = True
                    if expected and sent < expected:
                        truncated = (
                            f"the video ended after {sent} of the {expected} frames its "
                            f"header announces (truncated or damaged)"
                        )
                    break
                small = fit_width(frame, args.max_width)
                scale = small.shape[1] / frame.shape[1]
                parts = encode_frame(small, stream, sent, encoding, 90)
                # a full queue is retried soon, like an unanswered frame
                when = now if bus.send_nowait(detect, parts) else now - ledger.resend_s + 0.05
                ledger.sent(sent, parts, when)
                sent += 1
            if ended and not ledger.in_flight:
                break
            if results.poll(50):
                for header in answers(results, stream, log):
                    if ledger.answer(header.seq):
                        if not ready:
                            ready_at = time.monotonic()
                            log.info("the pipeline answered after %.1f s", ready_at - started)
                        ready = True
                        collector.add(header)
                        progress.update(1)
            now = time.monotonic()
            if ready:
                for _seq, parts in ledger.due_again(now):
                    bus.send_nowait(detect, parts)
                for seq, reason in list(ledger.given_up.items()):
                    if seq not in collector.pending and seq >= collector.next:
                        collector.give_up(seq, reason)
                        progress.update(1)
            else:
                check()
                if now - started > args.ready_timeout_s:
                    raise TimeoutError(
                        f"no detector and classifier answered within "
                        f"{args.ready_timeout_s:.0f} s at {addr.host}:{addr.base_port}"
                    )
                if now >= next_notice:
                    log.info(
                        "waiting for a detector and a classifier to answer at %s:%d "
                        "(a classifier loads its model first)",
                        addr.host,
                        addr.base_port,
                    )
                    next_notice = now + 10.0
                    for flight in ledger.in_flight.values():  # keep them coming, uncounted
                        bus.send_nowait(detect, flight.parts)
            collector.drain()
        collector.drain()
        collector.finish()
    finally:
        progress.close()
        reader.release()
        detect.close()
        results.close()
        ctx.term()
    seconds = time.monotonic() - started
    return {
        "cpu_s": time.process_time() - cpu_started,
        "ready_after_s": ready_at - started if ready_at else None,
        "rows": collector.rows,
        "events": collector.events,
        "model": collector.model,
        "fps": fps,
        "scale": scale,
        "frames": sent,
        "expected": expected,
        "truncated": truncated,
        "given_up": dict(ledger.given_up),
        "seconds": seconds,
    }


def write_outputs(video: Path, out: Path, job: dict, privacy: str = "none") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = job["rows"]
    outputs.write_csv(out / "frames.csv", rows, job["scale"])
    tracks = outputs.track_summaries(job["events"])
    missing = {row.index: row.missing for row in rows if row.missing}
    partial = bool(job["truncated"] or missing)
    summary = {
        "video": str(video),
        "model": job["model"],
        "fps": job["fps"],
        "frames": job["frames"],
        "frames_in_header": job["expected"],
        "frames_labelled": len(rows) - len(missing),
        "frames_with_faces": sum(1 for r in rows if r.faces),
        "partial": partial,
        "truncated": job["truncated"] or None,
        "missing_frames": {str(k): v for k, v in sorted(missing.items())},
        "seconds": round(job["seconds"], 2),
        "analyze_cpu_s_while_labelling": round(job["cpu_s"], 2),
        "frames_per_s": round(job["frames"] / max(job["seconds"], 1e-9), 2),
        "pipeline_ready_after_s": (None if job["ready_after_s"] is None else round(job["ready_after_s"], 2)),
        "frames_per_s_once_ready": (
            None
            if job["ready_after_s"] is None
            else round(job["frames"] / max(job["seconds"] - job["ready_after_s"], 1e-9), 2)
        ),
        "tracks": tracks,
    }
    outputs.write_json(out / "tracks.json", summary)
    outputs.write_timeline(out / "timeline.png", rows, f"{video.name}: emotions per person")
    outputs.write_annotated(
        out / "annotated.mp4", video, rows, job["fps"], job["scale"], job["model"], privacy
    )
    return summary


def analyze(args) -> int:
    """The whole job of the command line: check, pick or start a pipeline, label, write."""
    video = Path(args.video)
    if not video.is_file():
        config_error(SERVICE, f"{video}: no such video file")
    if args.in_flight < 1 or args.attempts < 1 or args.resend_ms <= 0:
        config_error(SERVICE, "--in-flight and --attempts must be at least 1, --resend-ms above 0")
    probe = cv2.VideoCapture(str(video))
    readable = probe.isOpened() and probe.read()[0]
    probe.release()
    if not readable:
        config_error(
            SERVICE, f"{video}: cannot be read as a video (not a video, or damaged before its first frame)"
        )
    out = Path(args.out) if args.out else video.with_name(f"{video.stem}-emotions")
    running = broker_answers(args.broker_host, args.base_port)
    if args.pipeline == "running" and not running:
        config_error(
            SERVICE, f"no broker answers at {args.broker_host}:{args.base_port} (--pipeline running)"
        )
    own = None
    if args.pipeline == "start" or not running:
        own = OwnPipeline(args.detectors, args.classifiers, args.registry, args.detector)
        addr = own.addr
    else:
        addr = bus.client_address(SERVICE, args.broker_host, args.base_port, args.curve_keys)
        log.info("using the pipeline at %s:%d", args.broker_host, args.base_port)
    encoding = args.encoding
    if encoding == "auto":
        encoding = ENCODING_BGR if own else ENCODING_JPEG
    try:
        job = run_job(video, addr, args, own.check if own else lambda: None, encoding)
    except (TimeoutError, RuntimeError) as exc:
        print(f"{SERVICE}: {exc}", file=sys.stderr)
        return 1
    finally:
        if own:
            own.stop()
    summary = write_outputs(video, out, job, args.privacy)
    print(
        f"{video}: {summary['frames_labelled']} of {summary['frames']} frames labelled, "
        f"{summary['frames_with_faces']} with faces, {len(summary['tracks'])} track(s), "
        f"{summary['frames_per_s_once_ready']} frames/s once the pipeline answered -> {out}/"
    )
    if summary["partial"]:
        print(
            f"{SERVICE}: partial result: {summary['truncated'] or ''} "
            f"{len(summary['missing_frames'])} frame(s) without a result (see tracks.json)",
            file=sys.stderr,
        )
        return PARTIAL
    return 0
