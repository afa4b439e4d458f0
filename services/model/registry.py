"""The model registry: a directory of versions and a pointer to the served one.

    models/
      current              one line: the served version (replaced atomically)
      history.json         versions promoted so far, oldest first (for rollback)
      <version>/
        model.keras        the Keras 3 model
        metadata.json      version, input spec, class names, metrics, training arguments
        eval-<split>.json, confusion-<split>.png   evaluation artefacts
        model-<precision>-<digest>.tflite   the model converted for LiteRT (see tflite_file)

Writers only ever rename complete files into place, so a reader (a running
classifier) sees either the old pointer or the new one, never half of either.
See docs/models.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.protocol import EMOTIONS

from .preprocess import InputSpec

CURRENT = "current"
HISTORY = "history.json"
MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
TFLITE_PRECISIONS = ("float32", "int8")  # what a TFLite flatbuffer of ours computes in
# How a version is run on each face: "flip" averages with the mirror image (2x compute).
TTA_MODES = ("none", "flip")
# The arithmetic a version is run in: bfloat16 halves the work on CPUs that do it natively;
# int8 (weights stored as 8-bit integers, run by LiteRT) takes about a quarter of float32's.
PRECISIONS = ("float32", "bfloat16", "int8")


class RegistryError(Exception):
    """A registry or model problem, worded for the person who has to fix it."""


@dataclass
class ModelEntry:
    version: str
    path: Path
    metadata: dict

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def spec(self) -> InputSpec:
        try:
            return InputSpec.from_dict(self.metadata["input"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RegistryError(f"{self.path / METADATA_FILE}: bad or missing 'input' spec ({exc})") from None

    def _setting(self, key: str, choices: tuple, default: str) -> str:
        value = self.metadata.get(key, default)
        if value not in choices:
            raise RegistryError(
                f"{self.path / METADATA_FILE}: {key!r} is {value!r}, expected one of {', '.join(choices)}"
            )
        return value

    @property
    def tta(self) -> str:
        """Test-time augmentation the version is served and scored with (default none)."""
        return self._setting("tta", TTA_MODES, "none")

    @property
    def precision(self) -> str:
        """The arithmetic the version is served and scored in (default float32)."""
        return self._setting("precision", PRECISIONS, "float32")


def atomic_write(path: Path, content: str | bytes) -> None:
    """Write a whole file next to ``path`` and rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from other users' services
        with os.fdopen(fd, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_entry(path: Path) -> ModelEntry:
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not (path / MODEL_FILE).is_file():
        raise RegistryError(f"{path}: no {MODEL_FILE} in this model version")
    try:
        metadata = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise RegistryError(f"{meta_file}: missing") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{meta_file}: not valid JSON ({exc})") from None
    return ModelEntry(version=str(metadata.get("version", path.name)), path=path, metadata=metadata)


def tflite_file(entry: ModelEntry, precision: str) -> Path:
    """Where the version's model, converted to TFLite in ``precision``, is kept.

    Converting needs TensorFlow: about 5 s to import and 400 MB of memory in every
    classifier. The flatbuffer depends only on model.keras and the precision, so it is
    kept beside them, named by a digest of model.keras: a changed model.keras never
    meets an old flatbuffer, and a classifier that finds it runs on LiteRT alone."""
    if precision not in TFLITE_PRECISIONS:
        raise ValueError(f"TFLite runs {' and '.join(TFLITE_PRECISIONS)}, not {precision}")
    digest = hashlib.sha256(entry.model_file.read_bytes()).hexdigest()[:16]
    return entry.path / f"model-{precision}-{digest}.tflite"


def keep_tflite(path: Path, content: bytes) -> str:
    """Keep a converted flatbuffer at ``path`` (tflite_file) for the next start; returns why
    it could not ("" when it could): a read-only registry only costs the next start a
    conversion."""
    try:
        if not path.is_file():
            atomic_write(path, content)
    except OSError as exc:
        return f"{path.parent}: cannot keep the TFLite model there ({exc.strerror or exc})"
    return ""


def current_version(root: Path) -> str | None:
    try:
        version = (Path(root) / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return version or None


def resolve(root: Path, version: str | None = None) -> ModelEntry:
    """The entry for ``version``, or for the served version when None."""
    root = Path(root)
    if version is None:
        version = current_version(root)
        if version is None:
            raise RegistryError(
                f"no model is promoted in {root} (missing {root / CURRENT}). Train one with "
                f"`python -m training train ...` and promote it with "
                f"`python -m training promote VERSION`, or pass --model PATH/model.keras"
            )
    if "/" in version or version.startswith("."):
        raise RegistryError(f"invalid version name {version!r}")
    if not (root / version).is_dir():
        raise RegistryError(f"version {version!r} not found in {root}")
    return read_entry(root / version)


def list_versions(root: Path) -> list[ModelEntry]:
    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for child in sorted(root.iterdir()):
        # hidden names are versions still being written (see training/train.py register)
        if child.is_dir() and not child.name.startswith(".") and (child / METADATA_FILE).is_file():
            try:
                entries.append(read_entry(child))
            except RegistryError:
                continue
    return entries


def history(root: Path) -> list[str]:
    try:
        data = json.loads((Path(root) / HISTORY).read_text())
    except FileNotFoundError:
        return []
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{Path(root) / HISTORY}: not valid JSON ({exc})") from None
    return [str(v) for v in data]


def load_model(entry: ModelEntry):
    """Load the Keras model of an entry, with errors that name the file."""
    if not zipfile.is_zipfile(entry.model_file):  # rejected without importing Keras
        raise RegistryError(f"{entry.model_file}: not a Keras model file (a .keras file is a zip archive)")
    import keras

    try:
        return keras.saving.load_model(entry.model_file, compile=False)
    except Exception as exc:
        raise RegistryError(f"{entry.model_file}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def check_model(model, spec: InputSpec, where: str) -> None:
    """A model may be served only if it takes the declared input and returns 7 probabilities."""
    want = (None, *spec.shape)
    got = tuple(model.input_shape) if hasattr(model, "input_shape") else None
    if got != want:
        raise RegistryError(f"{where}: model input shape {got}, metadata declares {want}")
    check_answers(lambda x: model(x, training=False), spec, where)


def check_answers(call, spec: InputSpec, where: str) -> None:
    """``call`` (a model, or its converted copy) answers 7 probabilities per face."""
    probe = np.random.default_rng(0).random((2, *spec.shape), dtype=np.float32)
    out = np.asarray(call(probe))
    if out.shape != (2, len(EMOTIONS)):
        raise RegistryError(f"{where}: model output shape {out.shape[1:]}, expected ({len(EMOTIONS)},)")
    if not np.all(np.isfinite(out)) or not np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        raise RegistryError(f"{where}: model outputs are not probabilities (softmax)")


def load_checked(entry: ModelEntry):
    """Load an entry's model and prove it takes the declared input and answers 7 probabilities."""
    model = load_model(entry)
    check_model(model, entry.spec, str(entry.model_file))
    return model


def check_servable(entry: ModelEntry) -> None:
    """Prove a version can be served as the classifier would serve it: from its kept
    TFLite model where that runs alone (an int8 version: no TensorFlow to import), else
    by loading the Keras model. Both must answer 7 probabilities."""
    from .runtime import kept_tflite, runner_from_kept

    runner, _ = runner_from_kept(entry, kept_tflite(entry))
    if runner is None:
        load_checked(entry)


def promote(root: Path, version: str) -> ModelEntry:
    """Make ``version`` the served model, after proving it loads and answers correctly."""
    root = Path(root)
    entry = resolve(root, version)
    check_servable(entry)
    past = history(root)
    if not past or past[-1] != version:
        past.append(version)
    atomic_write(root / HISTORY, json.dumps(past, indent=1) + "\n")
    atomic_write(root / CURRENT, version + "\n")
    return entry


def rollback(root: Path) -> str:
    """Serve the version promoted before the current one again."""
    root = Path(root)
    past = history(root)
    current = current_version(root)
    if current is not None and past and past[-1] == current:
        past.pop()
    while past and not (root / past[-1]).is_dir():
        past.pop()
    if not past:
        raise RegistryError(f"nothing to roll back to in {root}: no earlier promoted version")
    previous = past[-1]
    check_servable(resolve(root, previous))
    atomic_write(root / HISTORY, json.dumps(past, indent=1) + "\n")
    atomic_write(root / CURRENT, previous + "\n")
    return previous


def build_version(root: Path, version: str, fill) -> Path:
    """Create <root>/<version> whole: ``fill(folder)`` writes into a hidden temporary
    folder, which is then renamed into place. The rename is atomic, so a reader sees the
    whole version or none of it; a failure removes the temporary folder, and an existing
    version is never replaced."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / version
    if final.exists():
        raise RegistryError(f"version {version!r} already exists in {root}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=root))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the version from other users' services
        fill(tmp)
        if final.exists():
            raise RegistryError(f"version {version!r} appeared in {root} meanwhile")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def import_versions(source: Path, root: Path) -> tuple[list[str], list[str]]:
    """Copy the versions of registry ``source`` that ``root`` lacks; returns (copied, kept).

    A version already in ``root`` is never replaced (versions are immutable), so this
    brings a newer bundled model into a registry without touching models trained in it.
    """
    source, root = Path(source), Path(root)
    if not source.is_dir():
        raise RegistryError(f"{source}: no such registry directory")
    copied, kept = [], []
    for entry in list_versions(source):
        name = entry.path.name
        if (root / name).exists():
            kept.append(name)
            continue

        def copy_files(folder: Path, origin: Path = entry.path) -> None:
            for item in origin.iterdir():
                if item.is_file():
                    shutil.copyfile(item, folder / item.name)

        build_version(root, name, copy_files)
        copied.append(name)
    return copied, kept
