"""Classifier: pulls face crops, classifies them in dynamic batches, publishes results.

Results go to the ``results`` fan-out channel, one message per frame (also for frames
without faces), each naming the model version that produced it. A newer frame of a live
stream takes the place of one still waiting for its batch (reason ``superseded``), so an
overloaded classifier keeps up with the newest frames instead of labelling none in time.
A version served with flip TTA runs each face as is and mirrored. For live streams the
classifier by default runs each face once, mirrored on every other frame of the stream
(``--live-tta alternate``): the tracker's smoothing then averages both views over time, so
the labels it shows match flip TTA's on 98 % of frames (bench/results/live-tta.md) for half
the model work. Analyze jobs, whose every frame is reported, always get the version's TTA.
"""
from __future__ import annotations

import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import zmq
from prometheus_client import Counter, Histogram

from services.common import bus
from services.common.config import config_error, service_parser, setup_logging
from services.common.metrics import RejectLog, drop, serve_metrics
from services.common.protocol import (EMOTIONS, KIND_FACES, KIND_RESULT, FaceResult, Header,
                                      Rejected, decode, decode_crops, encode, is_job)
from services.model import registry
from services.model.preprocess import preprocess_faces
from services.model.runtime import RUNTIMES

from .batching import Batcher, BatchPolicy, PendingFaces
from .serving import RELOADS, ModelWatcher, announce, describe, load_served_model

LIVE_ALTERNATE = "alternate"
LIVE_TTA = (LIVE_ALTERNATE, "version", "none")
DRAIN_LIMIT = 256   # messages taken from the queue per pass (stale ones dropped, older replaced)
FACES = Counter("emotion_classifier_faces_total", "Faces classified, by predicted emotion", ["emotion"])
BATCH_SIZE = Histogram("emotion_classifier_batch_size", "Faces per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))
INFERENCE_SECONDS = Histogram("emotion_classifier_inference_seconds",
                              "Preprocessing plus model time per batch",
                              buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0))
QUEUE_WAIT = Histogram("emotion_classifier_queue_wait_seconds",
                       "Time a message waited in the batcher before its batch ran",
                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2))


def build_parser():
    parser = service_parser("classifier", __doc__.splitlines()[0], metrics_port=9103)
    policy = BatchPolicy()
    parser.option("--registry", default="models",
                  help="model registry directory; the version named in its 'current' file is served")
    parser.option("--model", default="",
                  help="serve this model instead: a version directory or a model.keras file "
                       "(with metadata.json beside it)")
    parser.option("--runtime", default="auto", choices=list(RUNTIMES),
                  help="tf-function: the Keras model behind tf.function; tflite: converted to "
                       "TensorFlow Lite when loaded (about half the CPU per face at batch 1, "
                       "but one thread and float32 only); auto: TFLite for batches of up to "
                       "8 model inputs (a face with flip TTA is 2) and tf-function above, or "
                       "tf-function alone for a bfloat16 version on a CPU with native bfloat16")
    parser.option("--live-tta", default=LIVE_ALTERNATE, choices=list(LIVE_TTA),
                  help="for a flip-TTA version, how faces of live streams (all but analyze "
                       "jobs) are run: alternate: once, mirrored on every other frame (the "
                       "tracker averages both views); version: as is and mirrored on every "
                       "frame (twice the model work); none: once, as is (less accurate)")
    parser.option("--max-batch", default=policy.max_batch, type=int, help="largest batch of faces")
    parser.option("--max-wait-ms", default=policy.max_wait_ms, type=float,
                  help="longest a face waits for its batch to fill")
    parser.option("--max-age-ms", default=500.0, type=float,
                  help="drop faces of frames captured longer ago than this (0 = never)")
    parser.option("--reload-poll-s", default=1.0, type=float,
                  help="how often to check the registry for a newly promoted model "
                       "(0 = never; POST /reload on the metrics port checks at once)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def load_entry(registry_dir: str, model: str) -> registry.ModelEntry:
    """The model to serve: --model when given, otherwise the registry's current version."""
    if not model:
        return registry.resolve(Path(registry_dir))
    path = Path(model)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise registry.RegistryError(f"--model {model}: no such file or directory")
    return registry.read_entry(path)


def results_message(header: Header, probabilities: np.ndarray, version: str) -> list:
    results = []
    for box, scores in zip(header.boxes, probabilities):
        best = int(np.argmax(scores))
        results.append(FaceResult(box=box, label=EMOTIONS[best], confidence=float(scores[best]),
                                  scores=[float(s) for s in scores]))
    out = Header(kind=KIND_RESULT, stream=header.stream, seq=header.seq, width=header.width,
                 height=header.height, timestamps={**header.timestamps, "classify": time.time()},
                 boxes=header.boxes, results=results, model=version)
    return encode(out)


def classify(items: list[PendingFaces], runner, tta: str | None) -> np.ndarray:
    """Probabilities for every crop of the items, in order, in one model call."""
    if len({item.crops.shape[1:] for item in items}) == 1:
        return runner.predict_faces(np.concatenate([item.crops for item in items]), tta)
    # Crops of different sizes (detectors with different --crop-size) cannot share one
    # array: bring each message's crops to the model's input size first.
    return runner.predict_inputs(np.concatenate(
        [preprocess_faces(item.crops, runner.spec) for item in items]), tta)


class LiveTta:
    """The TTA each frame gets: a job's is the version's; a live stream's follows
    ``--live-tta``, and with ``alternate`` flips between as-is and mirrored per stream
    (counted over the frames this replica classifies, so dropped frames do not matter)."""

    MAX_STREAMS = 4096

    def __init__(self, mode: str, version_tta: str):
        self.mode, self.version_tta = mode, version_tta
        self.mirrored: OrderedDict[str, bool] = OrderedDict()

    def __call__(self, header: Header) -> str | None:
        if self.version_tta != "flip" or self.mode == "version" or is_job(header.stream):
            return None
        if self.mode == "none":
            return "none"
        mirror = not self.mirrored.pop(header.stream, True)
        self.mirrored[header.stream] = mirror
        if len(self.mirrored) > self.MAX_STREAMS:
            self.mirrored.popitem(last=False)
        return "mirror" if mirror else "none"


def run_batch(batch: list[PendingFaces], runner, version: str, now: float,
              max_age: float = 0.0, live_tta=None) -> list[list]:
    """Classify every crop of the batch, one model call per TTA in it (``live_tta``, a
    :class:`LiveTta`, chooses each frame's; None: the version's); one result message per
    frame.

    Frames captured more than ``max_age`` ago by now (0 = no limit) get no message and are
    counted as stale: the age is tested again after the model call, because a paused or
    starved process can hold a batch for seconds after its frames were still fresh.
    """
    started = time.perf_counter()
    groups: dict[str | None, list[int]] = {}
    for i, item in enumerate(batch):
        groups.setdefault(live_tta(item.header) if live_tta else None, []).append(i)
    scores_of: dict[int, np.ndarray] = {}
    for tta, members in groups.items():
        probabilities, start = classify([batch[i] for i in members], runner, tta), 0
        BATCH_SIZE.observe(len(probabilities))
        for i in members:
            n = len(batch[i].crops)
            scores_of[i], start = probabilities[start:start + n], start + n
    INFERENCE_SECONDS.observe(time.perf_counter() - started)
    messages = []
    for i, item in enumerate(batch):
        QUEUE_WAIT.observe(max(0.0, now - item.arrived))
        scores = scores_of[i]
        for row in scores:
            FACES.labels(EMOTIONS[int(np.argmax(row))]).inc()
        if max_age and not is_job(item.header.stream) and \
                bus.age_seconds(item.header.timestamps) > max_age:
            drop("classifier", "stale")
            continue
        messages.append(results_message(item.header, scores, version))
    return messages


def main(argv=None) -> None:
    args = parse_args(argv)
    log = setup_logging("classifier", args.log_level)
    try:
        served = load_served_model(load_entry(args.registry, args.model), args.runtime)
    except registry.RegistryError as exc:
        config_error("classifier", str(exc))
    announce(served)
    log.info("serving %s", describe(served))
    watcher = None
    if not args.model:
        watcher = ModelWatcher(Path(args.registry), served.version, args.reload_poll_s, log,
                               args.runtime).start()
    actions = {"/reload": watcher.request_reload} if watcher else {}
    serve_metrics(args.metrics_port, args.metrics_host, actions=actions)
    addr = bus.client_address("classifier", args.broker_host, args.base_port, args.curve_keys)
    ctx = zmq.Context()
    faces_in = bus.consumer(ctx, addr, "classify")
    results_out = bus.producer(ctx, addr, "results")
    rejected = RejectLog("classifier", log)
    batcher = Batcher(BatchPolicy(args.max_batch, args.max_wait_ms))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    live_tta = LiveTta(args.live_tta, served.runner.tta)
    max_age = args.max_age_ms / 1000.0
    max_skew = args.max_clock_skew_ms / 1000.0
    while not stop.is_set():
        wait = batcher.wait_ms(time.monotonic())
        if faces_in.poll(200 if wait is None else wait):
            for _ in range(DRAIN_LIMIT):
                try:
                    parts = faces_in.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    header, payloads = decode(parts, expect_kind=KIND_FACES, max_skew_s=max_skew)
                except Rejected as exc:
                    rejected(exc)
                    continue
                if max_age and not is_job(header.stream) and \
                        bus.age_seconds(header.timestamps) > max_age:
                    drop("classifier", "stale")
                    continue
                if not payloads:
                    results_out.send_multipart(results_message(header, np.zeros((0, 7)), served.version))
                    continue
                item = PendingFaces(header, decode_crops(header, payloads), time.monotonic())
                if is_job(header.stream) or header.flow or not batcher.replace_older(item):
                    batcher.add(item)
                else:
                    drop("classifier", "superseded")
        # A new model is swapped in only here, between two batches.
        fresh = watcher.take_ready() if watcher else None
        if fresh is not None:
            live_tta = LiveTta(args.live_tta, fresh.runner.tta)
            announce(fresh, served)
            RELOADS.labels("ok").inc()
            log.info("now serving %s (was %s)", describe(fresh), served.version)
            served = fresh
        now = time.monotonic()
        if batcher.ready(now):
            for message in run_batch(batcher.take(), served.runner, served.version, now, max_age,
                                     live_tta):
                results_out.send_multipart(message)
    if watcher:
        watcher.stop()
    faces_in.close()
    results_out.close()
    ctx.term()


if __name__ == "__main__":
    main()
