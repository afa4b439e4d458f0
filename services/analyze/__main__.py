"""Analyze: a recorded video through the pipeline as a job; every frame labelled, nothing
dropped; frames.csv, tracks.json, timeline.png and annotated.mp4 out.

    python -m services.analyze clip.mp4 --out results/clip     (or: emotion-stream analyze ...)

Uses the pipeline whose broker answers at --broker-host/--base-port, or starts its own
(broker, --detectors, --classifiers) when none does. Frames go to the detectors with flow
control: at most --in-flight frames are in the pipeline at once, so nothing has to be
dropped, and a frame unanswered for --resend-ms is sent again. Exit status 0 when every
frame has a result, 3 when the result is partial (a truncated video, frames given up; the
outputs say which), 78 for a video that cannot be opened.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cv2
import zmq
from tqdm import tqdm

from services.capture.frames import encode_frame
from services.capture.sources import fit_width
from services.common import bus
from services.common.config import config_error, service_parser, setup_logging
from services.common.flow import Ledger, answers
from services.common.protocol import ENCODING_BGR, ENCODING_JPEG, JOB_PREFIX

from . import outputs
from .job import Collector

SERVICE = "analyze"
PARTIAL = 3
log = logging.getLogger(SERVICE)


def build_parser():
    parser = service_parser(SERVICE, __doc__.splitlines()[0], metrics_port=0)
    parser.add_argument("video", help="the video file to analyse")
    parser.option("--out", default="", help="output folder (default: <video>-emotions beside it)")
    parser.option("--in-flight", default=8, type=int,
                  help="most frames in the pipeline at once (flow control); more keeps more "
                       "replicas busy")
    parser.option("--resend-ms", default=5000.0, type=float,
                  help="send a frame again when it has no result after this long")
    parser.option("--attempts", default=4, type=int, help="sends of a frame before giving it up")
    parser.option("--ready-timeout-s", default=180.0, type=float,
                  help="longest to wait for the pipeline's first answer (a classifier loads "
                       "its model first)")
    parser.option("--pipeline", default="auto", choices=("auto", "running", "start"),
                  help="auto: use the running pipeline, else start one; running: only use a "
                       "running one; start: always start one of its own")
    parser.option("--detectors", default=1, type=int, help="detectors of a pipeline it starts")
    parser.option("--classifiers", default=1, type=int, help="classifiers of a pipeline it starts")
    parser.option("--registry", default="models", help="model registry of a pipeline it starts")
    parser.option("--max-width", default=640, type=int,
                  help="downscale wider frames to this width before sending (0 = never); "
                       "boxes in the outputs are in the video's own pixels")
    parser.option("--encoding", default="auto", choices=("auto", ENCODING_JPEG, ENCODING_BGR),
                  help="how frames travel: bgr (raw: no JPEG coding, more bytes), jpeg, or auto: "
                       "bgr to a pipeline it starts on this machine, jpeg to a running one, "
                       "which may be on other machines")
    parser.option("--progress", default=True, type=bool, help="show a progress bar")
    return parser


def broker_answers(host: str, base_port: int) -> bool:
    """Whether a broker listens at the address (its detect port takes connections)."""
    try:
        with socket.create_connection((host, base_port + bus.CHANNELS["detect"]), timeout=1.0):
            return True
    except OSError:
        return False


class OwnPipeline:
    """Broker, detectors and classifiers as child processes, on free ports, for one job.
    They take every frame in order with no age limit (--no-newest-only, --max-age-ms 0)."""

    def __init__(self, args):
        self.base = free_base_port()
        common = ["--base-port", str(self.base), "--metrics-port", "0",
                  "--log-level", "WARNING"]
        plan = [("broker", [])]
        plan += [("detector", ["--no-newest-only", "--max-age-ms", "0"])] * args.detectors
        plan += [("classifier", ["--max-age-ms", "0", "--registry", args.registry])] * args.classifiers
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.procs = [subprocess.Popen([sys.executable, "-m", f"services.{name}", *common, *extra],
                                       env=env, stdin=subprocess.DEVNULL)
                      for name, extra in plan]
        log.info("started a pipeline of its own on base port %d: %d detector(s), %d classifier(s)",
                 self.base, args.detectors, args.classifiers)

    def check(self) -> None:
        failed = [p.args[2] for p in self.procs if p.poll() is not None]
        if failed:
            raise RuntimeError(f"{', '.join(failed)} of the started pipeline exited")

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_base_port(count: int = 10) -> int:
    """The first of ``count`` consecutive free ports (asked of the kernel, then checked)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65536 and all(_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no block of free ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def run_job(video: Path, addr: bus.BrokerAddress, args, check=lambda: None,
            encoding: str = ENCODING_JPEG) -> dict:
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
    progress = tqdm(total=expected or None, unit="frame", disable=not args.progress,
                    desc=video.name, dynamic_ncols=True)
    sent = 0
    scale = 1.0
    ended, truncated, ready, ready_at = False, "", False, None
    started = time.monotonic()
    cpu_started = time.process_time()
    next_notice = started + 5.0
    time.sleep(0.3)                     # let the subscription reach the broker
    try:
        while True:
            now = time.monotonic()
            while not ended and ledger.room():
                ok, frame = reader.read()
                if not ok or frame is None:
                    ended = True
                    if expected and sent < expected:
                        truncated = (f"the video ended after {sent} of the {expected} frames its "
                                     f"header announces (truncated or damaged)")
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
                for seq, parts in ledger.due_again(now):
                    bus.send_nowait(detect, parts)
                for seq, reason in list(ledger.given_up.items()):
                    if seq not in collector.pending and seq >= collector.next:
                        collector.give_up(seq, reason)
                        progress.update(1)
            else:
                check()
                if now - started > args.ready_timeout_s:
                    raise TimeoutError(f"no detector and classifier answered within "
                                       f"{args.ready_timeout_s:.0f} s at {addr.host}:{addr.base_port}")
                if now >= next_notice:
                    log.info("waiting for a detector and a classifier to answer at %s:%d "
                             "(a classifier loads its model first)", addr.host, addr.base_port)
                    next_notice = now + 10.0
                    for seq, flight in ledger.in_flight.items():   # keep them coming, uncounted
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
    return {"cpu_s": time.process_time() - cpu_started,
            "ready_after_s": ready_at - started if ready_at else None, "rows": collector.rows, "events": collector.events, "model": collector.model,
            "fps": fps, "scale": scale, "frames": sent, "expected": expected,
            "truncated": truncated, "given_up": dict(ledger.given_up), "seconds": seconds}


def write_outputs(video: Path, out: Path, job: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = job["rows"]
    outputs.write_csv(out / "frames.csv", rows, job["scale"])
    tracks = outputs.track_summaries(job["events"])
    missing = {row.index: row.missing for row in rows if row.missing}
    partial = bool(job["truncated"] or missing)
    summary = {"video": str(video), "model": job["model"], "fps": job["fps"],
               "frames": job["frames"], "frames_in_header": job["expected"],
               "frames_labelled": len(rows) - len(missing),
               "frames_with_faces": sum(1 for r in rows if r.faces),
               "partial": partial, "truncated": job["truncated"] or None,
               "missing_frames": {str(k): v for k, v in sorted(missing.items())},
               "seconds": round(job["seconds"], 2),
               "analyze_cpu_s_while_labelling": round(job["cpu_s"], 2),
               "frames_per_s": round(job["frames"] / max(job["seconds"], 1e-9), 2),
               "pipeline_ready_after_s": (None if job["ready_after_s"] is None
                                          else round(job["ready_after_s"], 2)),
               "frames_per_s_once_ready": (None if job["ready_after_s"] is None else round(
                   job["frames"] / max(job["seconds"] - job["ready_after_s"], 1e-9), 2)),
               "tracks": tracks}
    outputs.write_json(out / "tracks.json", summary)
    outputs.write_timeline(out / "timeline.png", rows, f"{video.name}: emotions per person")
    outputs.write_annotated(out / "annotated.mp4", video, rows, job["fps"], job["scale"], job["model"])
    return summary


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(SERVICE, args.log_level)
    video = Path(args.video)
    if not video.is_file():
        config_error(SERVICE, f"{video}: no such video file")
    if args.in_flight < 1 or args.attempts < 1 or args.resend_ms <= 0:
        config_error(SERVICE, "--in-flight and --attempts must be at least 1, --resend-ms above 0")
    probe = cv2.VideoCapture(str(video))
    readable = probe.isOpened() and probe.read()[0]
    probe.release()
    if not readable:
        config_error(SERVICE, f"{video}: cannot be read as a video (not a video, or damaged "
                              f"before its first frame)")
    out = Path(args.out) if args.out else video.with_name(f"{video.stem}-emotions")
    running = broker_answers(args.broker_host, args.base_port)
    if args.pipeline == "running" and not running:
        config_error(SERVICE, f"no broker answers at {args.broker_host}:{args.base_port} "
                              f"(--pipeline running)")
    own = None
    if args.pipeline == "start" or not running:
        own = OwnPipeline(args)
        addr = bus.BrokerAddress("127.0.0.1", own.base)
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
    summary = write_outputs(video, out, job)
    print(f"{video}: {summary['frames_labelled']} of {summary['frames']} frames labelled, "
          f"{summary['frames_with_faces']} with faces, {len(summary['tracks'])} track(s), "
          f"{summary['frames_per_s_once_ready']} frames/s once the pipeline answered -> {out}/")
    if summary["partial"]:
        print(f"{SERVICE}: partial result: {summary['truncated'] or ''} "
              f"{len(summary['missing_frames'])} frame(s) without a result (see tracks.json)",
              file=sys.stderr)
        return PARTIAL
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
