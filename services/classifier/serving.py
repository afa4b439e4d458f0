"""Which model answers, and how a newly promoted one replaces it without a gap.

The :class:`ModelWatcher` polls the registry's ``current`` pointer. When it names a new
version, that version is loaded and validated *beside* the serving one, in a background
thread: it must load, take the input its metadata declares, return 7 probabilities and
be traced for every padded batch shape. Only then does the main loop swap it in, between
two batches. A version that fails is never served; the failure is logged and counted,
and retried only if its files change.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter, Gauge

from services.model import registry

RELOADS = Counter(
    "emotion_classifier_model_reloads_total",
    "Attempts to switch to a newly promoted model, by result",
    ["result"],
)
MODEL_INFO = Gauge("emotion_classifier_model_info", "The model version answering (value 1)", ["version"])


@dataclass
class ServedModel:
    version: str
    runner: object  # InferenceRunner
    source: str  # the model file, for logs


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


def load_served_model(
    entry: registry.ModelEntry, runtime: str = "auto", log: logging.Logger | None = None
) -> ServedModel:
    """Load, validate and warm up one registry entry (raises RegistryError).

    Where the runtime is TFLite alone (``--runtime tflite``, or ``auto`` for an int8
    version) and the version folder holds the converted model, LiteRT runs it and
    TensorFlow is never imported; otherwise the Keras model is loaded and converted, and
    the result kept there for the next start (registry.tflite_file)."""
    from services.model.runtime import InferenceRunner, RuntimeUnavailable, kept_tflite, runner_from_kept

    log = log or logging.getLogger(__name__)
    kept = kept_tflite(entry, runtime)
    runner, problem = runner_from_kept(entry, kept, runtime)
    if runner is not None:
        runner.warm_up()
        return ServedModel(entry.version, runner, str(kept))
    if problem:
        log.warning("%s: not used, converting model.keras again: %s", kept, problem)
        kept.unlink(missing_ok=True)
    try:
        model = registry.load_checked(entry)
        runner = InferenceRunner(model, entry.spec, runtime=runtime, tta=entry.tta, precision=entry.precision)
    except RuntimeUnavailable as exc:
        raise registry.RegistryError(
            f"{entry.model_file}: cannot serve with --runtime {runtime}: {exc}"
        ) from None
    if kept is not None and runner.flatbuffer is not None:
        problem = registry.keep_tflite(kept, runner.flatbuffer)
        if problem:
            log.info("%s; the next start converts it again", problem)
    runner.warm_up()
    return ServedModel(entry.version, runner, str(entry.model_file))


def describe(served: ServedModel) -> str:
    """How the model is run, for the logs: runtime, TTA and the precision really used."""
    from services.model.runtime import HYBRID, SMALL_BATCH

    runner = served.runner
    text = (
        f"model {served.version} ({served.source}) with the {runner.runtime} runtime, "
        f"tta {runner.tta}, precision {runner.precision}"
    )
    if runner.runtime == HYBRID and runner.precision == "bfloat16":
        text += f" above {SMALL_BATCH} model inputs (float32 on TFLite up to there)"
    if runner.precision_fallback:
        text += f" (the version asks for {runner.asked_precision}, but {runner.precision_fallback})"
    if runner.fold_note:
        text += f"; {runner.fold_note}"
    return text


def announce(served: ServedModel, previous: ServedModel | None = None) -> None:
    """Point emotion_classifier_model_info at the version that now answers."""
    if previous is not None and previous.version != served.version:
        MODEL_INFO.remove(previous.version)
    MODEL_INFO.labels(served.version).set(1)


def files_signature(root: Path, version: str) -> tuple:
    """What identifies a version's files on disk, so a fixed version is tried again."""
    folder = Path(root) / version
    stamps = []
    for name in (registry.MODEL_FILE, registry.METADATA_FILE):
        try:
            stat = (folder / name).stat()
            stamps.append((stat.st_mtime_ns, stat.st_size))
        except OSError:
            stamps.append(None)
    return (version, *stamps)


class ModelWatcher:
    """Polls ``<registry>/current`` and prepares the version it names for a swap."""

    def __init__(
        self, root: Path, serving_version: str, poll_s: float, log: logging.Logger, runtime: str = "auto"
    ):
        self.root = Path(root)
        self.runtime = runtime
        self.poll_s = poll_s
        self.log = log
        self.serving_version = serving_version
        self._ready: ServedModel | None = None
        self._failed: tuple | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> ModelWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def request_reload(self) -> dict:
        """Check the registry now (the operator's POST /reload)."""
        self._failed = None
        self._wake.set()
        return {"serving": self.serving_version, "current": registry.current_version(self.root)}

    def take_ready(self) -> ServedModel | None:
        """The validated new model, once, for the main loop to swap in between batches."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self.serving_version = ready.version
        return ready

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._wake.wait(self.poll_s or None)
            self._wake.clear()

    def check_once(self) -> None:
        version = registry.current_version(self.root)
        with self._lock:
            pending = self._ready.version if self._ready else None
        if version is None or version in (self.serving_version, pending):
            return
        signature = files_signature(self.root, version)
        if signature == self._failed:
            return
        self.log.info("registry now names %s; loading it beside %s", version, self.serving_version)
        try:
            served = load_served_model(registry.resolve(self.root, version), self.runtime, self.log)
        except registry.RegistryError as exc:
            self._failed = signature
            RELOADS.labels("failed").inc()
            self.log.error("not serving %s, keeping %s: %s", version, self.serving_version, exc)
            return
        with self._lock:
            self._ready = served
