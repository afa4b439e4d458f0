"""Training: data -> model -> per-epoch checkpoints -> a new registry version.

The run directory holds everything needed to continue an interrupted run:
``last.keras`` (model + optimizer state, so the LR schedule continues from its step),
``best.keras`` (best validation accuracy so far) and ``state.json`` (the run's
arguments, epoch, early-stopping counters, history). ``--resume`` reloads them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import keras
import numpy as np

from services.common.protocol import EMOTIONS
from services.model import registry
from services.model.preprocess import InputSpec
from services.model.runtime import InferenceRunner

from . import data as datasets
from . import evaluate, models

STATE_FILE = "state.json"
LAST, BEST = "last.keras", "best.keras"
TEACHER_TARGETS = "teacher-targets.npy"
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Arguments that belong to one invocation, not to the run, so --resume takes them anew.
SESSION_ARGS = ("resume", "epochs_this_run", "promote", "verbose")


class RunError(Exception):
    """A run cannot start or continue as asked (e.g. its out dir holds another run)."""


class Batches(keras.utils.PyDataset):
    """Batches of ``preprocess_faces`` output, made on the fly so memory stays small at
    any input size. The shuffle order depends only on (seed, epoch), so a resumed run
    sees the order the uninterrupted run would have seen. ``targets`` (one probability row
    per face of ``split``) replace the one-hot labels, e.g. a teacher's soft targets."""

    def __init__(
        self,
        split: datasets.Split,
        spec: InputSpec,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        indices: np.ndarray | None = None,
        class_weights: np.ndarray | None = None,
        targets: np.ndarray | None = None,
    ):
        super().__init__()
        self.split, self.spec, self.batch_size = split, spec, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.indices = np.arange(len(split)) if indices is None else np.asarray(indices)
        self.class_weights = class_weights
        self.targets = targets
        self._order, self._order_epoch = self.indices, None

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def _current_order(self) -> np.ndarray:
        if self.shuffle and self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order, self._order_epoch = rng.permutation(self.indices), self.epoch
        return self._order

    def __getitem__(self, i: int):
        picked = self._current_order()[i * self.batch_size : (i + 1) * self.batch_size]
        part = self.split.subset(picked)
        x = datasets.model_inputs(part.faces, self.spec)
        if self.targets is None:
            y = datasets.one_hot(part.labels)
        else:
            y = self.targets[picked]
        if self.class_weights is None:
            return x, y
        return x, y, self.class_weights[part.labels].astype(np.float32)

    def on_epoch_end(self):
        self.epoch += 1


class KeepFreedMemory(keras.callbacks.Callback):
    """Undoes TensorFlow's malloc setting for generator datasets (M_TRIM_THRESHOLD of
    128 kB, set as each epoch's input pipeline starts), which makes glibc hand every large
    tensor back to the kernel when freed and fault it in again, zeroed, at the next step:
    measured on 2 cores, 39 % of the training process's time went to page faults, and a
    step took 2.2 s instead of 1.3 s. Large blocks are kept for reuse instead (glibc only;
    elsewhere this does nothing)."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    KEEP_BYTES = 512 << 20  # freed memory at the top of the heap kept before trimming
    MMAP_BYTES = 32 << 20  # blocks below this come from the heap, not their own mmap

    def __init__(self):
        super().__init__()
        try:
            import ctypes

            self._mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            self._mallopt = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0 and self._mallopt is not None:
            self._mallopt(self.M_MMAP_THRESHOLD, self.MMAP_BYTES)
            self._mallopt(self.M_TRIM_THRESHOLD, self.KEEP_BYTES)


class RunCheckpoints(keras.callbacks.Callback):
    """Per-epoch last/best checkpoints, early stopping, and state.json, all resumable
    (Keras' own EarlyStopping forgets its counters when a run restarts)."""

    def __init__(self, out_dir: Path, state: dict, patience: int, epochs_this_run: int | None):
        super().__init__()
        self.out_dir, self.state = out_dir, state
        self.patience, self.epochs_this_run = patience, epochs_this_run
        self.epochs_done_here, self.started = 0, time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        state = self.state
        val_acc = float(logs.get("val_accuracy", float("nan")))
        state["history"].append({"epoch": epoch + 1, **{k: round(float(v), 6) for k, v in logs.items()}})
        if val_acc > state["best_val_accuracy"]:
            state.update(best_val_accuracy=val_acc, best_epoch=epoch + 1, wait=0)
            save_model(self.model, self.out_dir / BEST)
        else:
            state["wait"] += 1
        save_model(self.model, self.out_dir / LAST)
        state["epoch"] = epoch + 1
        state["optimizer_iterations"] = int(self.model.optimizer.iterations.numpy())
        now = time.monotonic()
        state["train_seconds"] = round(state["train_seconds"] + now - self.started, 1)
        self.started = now
        if state["wait"] >= self.patience:
            state["stopped_early"] = True
            self.model.stop_training = True
            print(
                f"early stopping: no better val_accuracy for {self.patience} epochs "
                f"(best {state['best_val_accuracy']:.4f} at epoch {state['best_epoch']})"
            )
        self.epochs_done_here += 1
        if self.epochs_this_run and self.epochs_done_here >= self.epochs_this_run:
            self.model.stop_training = True
        write_json(self.out_dir / STATE_FILE, state)


def save_model(model, path: Path) -> None:
    """model.save to a temporary name, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.stem}.tmp.keras")
    model.save(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    registry.atomic_write(path, json.dumps(data, indent=1) + "\n")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the run ---------------------------------------------------------------------------


def check_version_name(version: str) -> None:
    if not VERSION_RE.match(version):
        raise RunError(f"invalid version name {version!r}: letters, digits, '.', '_', '-' only")


def prepare_run(args: argparse.Namespace) -> tuple[argparse.Namespace, Path, dict]:
    """The run's arguments, directory and state: fresh, or reloaded for --resume."""
    if args.resume:
        if not args.out_dir:
            raise RunError("--resume needs --out-dir, the directory of the run to continue")
        out_dir = Path(args.out_dir)
        try:
            state = json.loads((out_dir / STATE_FILE).read_text())
        except FileNotFoundError:
            raise RunError(f"{out_dir / STATE_FILE}: missing, nothing to resume") from None
        saved = dict(state["args"])
        saved.update({k: getattr(args, k) for k in SESSION_ARGS if hasattr(args, k)})
        return argparse.Namespace(**saved), out_dir, state
    if not args.data:
        raise RunError("train needs --data (or --resume --out-dir DIR)")
    args.version = args.version or f"{args.arch}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    check_version_name(args.version)
    out_dir = Path(args.out_dir or Path("runs") / args.version)
    if (out_dir / STATE_FILE).exists():
        raise RunError(
            f"{out_dir} already holds a run: continue it with --resume, or choose another --out-dir"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = str(out_dir)
    saved = {k: v for k, v in vars(args).items() if k not in SESSION_ARGS and k != "func"}
    state = {
        "args": saved,
        "epoch": 0,
        "best_val_accuracy": -1.0,
        "best_epoch": 0,
        "wait": 0,
        "stopped_early": False,
        "train_seconds": 0.0,
        "optimizer_iterations": 0,
        "history": [],
        "started": utc_now(),
    }
    return args, out_dir, state


def load_splits(args) -> tuple[datasets.Dataset, datasets.Split, datasets.Split]:
    dataset = datasets.load_dataset(args.data, args.data_format, args.val_split, args.seed)
    train = dataset.split(datasets.TRAIN)
    if getattr(args, "ferplus", None):
        before = len(train)
        train = datasets.with_ferplus(
            train,
            datasets.load_ferplus(args.ferplus, datasets.TRAIN),
            args.ferplus_weight,
            not args.keep_not_faces,
            majority=getattr(args, "ferplus_majority", False),
        )
        if getattr(args, "ferplus_majority", False):
            print(
                f"FER+ votes {args.ferplus}: majority labels alone, "
                f"{before - len(train)} training faces without a majority class left out"
            )
        else:
            print(
                f"FER+ votes {args.ferplus}: weight {args.ferplus_weight}, "
                f"{before - len(train)} training faces left out as not faces"
            )
    if getattr(args, "folds", None):
        if args.holdout_fold is None or not 0 <= args.holdout_fold < args.folds:
            raise RunError(
                f"--folds {args.folds}: give --holdout-fold, 0 to {args.folds - 1}, "
                f"the fold this run leaves out (got {args.holdout_fold})"
            )
        fold = datasets.folds_of(train, dataset.split(datasets.TRAIN).labels, args.folds)
        train = train.subset(np.flatnonzero(fold != args.holdout_fold))
        print(f"fold {args.holdout_fold} of {args.folds} held out: training on the other {len(train)} faces")
    elif getattr(args, "holdout_fold", None) is not None:
        raise RunError("--holdout-fold needs --folds, the number of folds")
    train = datasets.subsample(train, args.max_train, args.seed)
    val = dataset.split(datasets.VAL)
    if getattr(args, "ferplus", None):
        val = datasets.with_majority(val, datasets.load_ferplus(args.ferplus, datasets.VAL, required=False))
    val = datasets.subsample(val, args.max_val, args.seed)
    return dataset, train, val


def selection_split(val: datasets.Split) -> datasets.Split:
    """What epochs are selected on: the FER+ majority of the validation faces that have one
    when the votes cover them, else the validation labels."""
    if val.majority is None:
        return val
    scored = val.subset(np.flatnonzero(val.majority >= 0))
    print(
        f"selecting epochs on the FER+ majority of {len(scored)} {datasets.VAL} faces "
        f"({len(val) - len(scored)} without one left out)"
    )
    return replace(scored, labels=scored.majority)


def compile_model(model, args, steps_per_epoch: int) -> None:
    total = max(1, args.epochs * steps_per_epoch)
    warmup = min(int(args.warmup_epochs * steps_per_epoch), total // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr * 0.05,
        warmup_target=args.lr,
        warmup_steps=warmup,
        decay_steps=max(1, total - warmup),
        alpha=0.01,
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )


def init_weights(model, spec: InputSpec, ref: str, root: Path) -> None:
    """Copy every weight of the model ``ref`` into ``model``; both must be the same network."""
    entry = evaluate.resolve_model(ref, root)
    if entry.spec.network() != spec.network():
        raise RunError(
            f"--init-from {ref}: its input is {entry.spec.to_dict()}, this run's is {spec.to_dict()}"
        )
    source = registry.load_model(entry)
    theirs = {w.path: w for w in source.weights}
    mismatched = [
        w.path for w in model.weights if w.path not in theirs or tuple(theirs[w.path].shape) != tuple(w.shape)
    ]
    if mismatched or len(theirs) != len(model.weights):
        raise RunError(
            f"--init-from {ref}: {entry.model_file} is not the same network as "
            f"{model.name} (first differing weight: "
            f"{mismatched[0] if mismatched else 'extra weights in the source'}); "
            f"use the same --arch, --width and --input-size"
        )
    for w in model.weights:
        w.assign(theirs[w.path])
    print(f"initialised {len(model.weights)} weights from {entry.model_file}")


def teacher_targets(
    refs: list[str],
    split: datasets.Split,
    root: Path,
    *,
    weight: float,
    temperature: float,
    whole_labels: np.ndarray | None = None,
) -> np.ndarray:
    """Distillation targets: ``weight`` x the teachers' mean flip-averaged probabilities
    (softened as p^(1/T), renormalised) + the rest x the split's own targets (the one-hot
    label, or its mix with FER+ votes), per face.

    A teacher trained with ``--folds N --holdout-fold K`` answers only for the faces of its
    fold K, which it never saw (cross-fitting): a teacher's answers on the faces it was
    trained on mostly repeat their labels. ``whole_labels`` are the labels of the whole
    Training split ``split`` was taken from, which define the folds."""
    if not 0 <= weight <= 1:
        raise RunError(f"--teacher-weight {weight}: must be between 0 and 1")
    if temperature <= 0:
        raise RunError(f"--teacher-temperature {temperature}: must be above 0")
    whole_labels = split.labels if whole_labels is None else whole_labels
    total = np.zeros((len(split), len(EMOTIONS)))
    answers = np.zeros(len(split))
    for ref in refs:
        entry = evaluate.resolve_model(ref, root)
        teacher = registry.load_checked(entry)
        faces, which = faces_for_teacher(entry, split, whole_labels)
        started = time.monotonic()
        probs = evaluate.predict(InferenceRunner(teacher, entry.spec, tta="flip"), split.subset(faces))
        total[faces] += probs
        answers[faces] += 1
        print(
            f"teacher {entry.version}: {len(faces)} training faces{which} in "
            f"{time.monotonic() - started:.0f} s, agrees with the labels on "
            f"{np.mean(probs.argmax(1) == split.labels[faces]):.1%}"
        )
    if (answers == 0).any():
        raise RunError(
            f"{int((answers == 0).sum())} training faces are in no fold a teacher "
            f"held out: give a teacher for every fold (--holdout-fold 0 to N-1), "
            f"or one trained on all of Training"
        )
    soft = (total / answers[:, None]) ** (1.0 / temperature)
    soft /= soft.sum(axis=1, keepdims=True)
    return (weight * soft + (1 - weight) * split.training_targets()).astype(np.float32)


def faces_for_teacher(
    entry: registry.ModelEntry, split: datasets.Split, whole_labels: np.ndarray
) -> tuple[np.ndarray, str]:
    """(indices into ``split`` the teacher answers for, a note for the log)."""
    training = entry.metadata.get("training") or {}
    folds, held_out = training.get("folds"), training.get("holdout_fold")
    if not folds:
        return np.arange(len(split)), ""
    trained_on = (entry.metadata.get("dataset") or {}).get("splits", {}).get(datasets.TRAIN)
    if trained_on != len(whole_labels):
        raise RunError(
            f"teacher {entry.version}: its folds are of a Training split of "
            f"{trained_on} faces, this run's has {len(whole_labels)}; fold "
            f"teachers must come from the same dataset"
        )
    fold = datasets.folds_of(split, whole_labels, folds)
    return np.flatnonzero(fold == held_out), f" (fold {held_out} of {folds}, held out from it)"


TEACHER_KEY_ARGS = (
    "teacher",
    "teacher_weight",
    "teacher_temperature",
    "data",
    "data_format",
    "val_split",
    "seed",
    "max_train",
    "ferplus",
    "ferplus_weight",
    "keep_not_faces",
    "folds",
    "holdout_fold",
)


def cached_teacher_targets(
    out_dir: Path, args, split: datasets.Split, root: Path, whole_labels: np.ndarray
) -> np.ndarray:
    """teacher_targets, saved in the run directory with what they were made from, so the
    teachers do not run again: not on --resume, nor when a run stopped before its first
    epoch ended is started again in the same directory with the same teachers and data."""
    path = out_dir / TEACHER_TARGETS
    key_path = path.with_suffix(".json")
    key = {name: getattr(args, name, None) for name in TEACHER_KEY_ARGS}
    if path.is_file():
        try:
            saved_key = json.loads(key_path.read_text())
        except (OSError, ValueError):
            saved_key = None
        if saved_key == key or (args.resume and saved_key is None):
            targets = np.load(path, allow_pickle=False)
            if targets.shape == (len(split), len(EMOTIONS)):
                print(f"teacher targets from {path}")
                return targets
            print(f"{path}: shape {targets.shape}, expected {(len(split), len(EMOTIONS))}; recomputing")
    targets = teacher_targets(
        args.teacher,
        split,
        root,
        weight=args.teacher_weight,
        temperature=args.teacher_temperature,
        whole_labels=whole_labels,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, targets, allow_pickle=False)
    os.replace(tmp, path)
    registry.atomic_write(key_path, json.dumps(key, indent=1) + "\n")
    return targets


def run(args: argparse.Namespace) -> int:
    args, out_dir, state = prepare_run(args)
    root = Path(args.registry)
    if (root / args.version).exists():
        raise registry.RegistryError(
            f"version {args.version!r} already exists in {root}; "
            f"versions are never overwritten, pass another --version"
        )
    keras.utils.set_random_seed(args.seed)
    spec = replace(
        models.input_spec(args.arch, args.input_size), normalisation=getattr(args, "normalisation", "none")
    )
    dataset, train, val = load_splits(args)
    print(
        f"data {args.data}: {dataset.sizes()}; training on {len(train)} "
        f"(per class {train.counts()}), validating on {len(val)} [{datasets.VAL}]"
    )

    indices, class_weights = None, None
    if args.balance == "oversample":
        indices = datasets.oversample_indices(train.labels, args.seed)
    elif args.balance == "class-weights":
        class_weights = datasets.balanced_class_weights(train.labels)
    targets = train.targets
    if getattr(args, "teacher", None):
        targets = cached_teacher_targets(out_dir, args, train, root, dataset.split(datasets.TRAIN).labels)
    batches = Batches(
        train,
        spec,
        args.batch_size,
        shuffle=True,
        seed=args.seed,
        epoch=state["epoch"],
        indices=indices,
        class_weights=class_weights,
        targets=targets,
    )
    val_batches = Batches(selection_split(val), spec, args.batch_size)

    if args.resume and state["epoch"]:
        model = keras.saving.load_model(out_dir / LAST)
        iterations = int(model.optimizer.iterations.numpy())
        if iterations != state["optimizer_iterations"]:
            raise RunError(
                f"{out_dir / LAST}: optimizer at step {iterations}, "
                f"state.json says {state['optimizer_iterations']}"
            )
        print(f"resuming {out_dir} at epoch {state['epoch'] + 1} of {args.epochs} (step {iterations})")
    else:
        model = models.build(
            args.arch, spec, width=args.width, dropout=args.dropout, weights=args.weights, seed=args.seed
        )
        if getattr(args, "init_from", None):
            init_weights(model, spec, args.init_from, root)
        compile_model(model, args, len(batches))
        write_json(
            out_dir / registry.METADATA_FILE,
            {
                "version": args.version,
                "architecture": args.arch,
                "input": spec.to_dict(),
                "classes": list(EMOTIONS),
            },
        )
        print(f"{model.name}: {model.count_params():,} parameters, input {spec.to_dict()}")

    done = state["stopped_early"] or state["epoch"] >= args.epochs
    if not done:
        model.fit(
            batches,
            validation_data=val_batches,
            epochs=args.epochs,
            initial_epoch=state["epoch"],
            verbose=args.verbose,
            callbacks=[
                KeepFreedMemory(),
                RunCheckpoints(out_dir, state, args.patience, args.epochs_this_run),
            ],
        )
        done = state["stopped_early"] or state["epoch"] >= args.epochs
    if not done:
        print(
            f"stopped after epoch {state['epoch']} of {args.epochs}; continue with:\n"
            f"  python -m training train --resume --out-dir {out_dir}"
        )
        return 0
    if not (out_dir / BEST).is_file():
        raise RunError(f"{out_dir / BEST}: missing, no epoch finished with a validation accuracy")

    best = keras.saving.load_model(out_dir / BEST, compile=False)
    tta = getattr(args, "tta", "none")
    report = evaluate.evaluate_split(best, spec, val, tta=tta, bench_seconds=args.bench_seconds)
    print(f"best epoch {state['best_epoch']} on {datasets.VAL}:")
    print(evaluate.format_report(report))
    metadata = {
        "version": args.version,
        "architecture": args.arch,
        "input": spec.to_dict(),
        "classes": list(EMOTIONS),
        "tta": tta,
        "dataset": {
            "path": str(args.data),
            "format": dataset.format,
            "splits": dataset.sizes(),
            "train_used": len(train),
            "val_used": len(val),
            "val_split": datasets.VAL,
        },
        "metrics": evaluate.summary(report, datasets.VAL),
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"],
        "training": state["args"],
        "git_commit": git_commit(),
        "created": utc_now(),
        "training_seconds": state["train_seconds"],
        "params": int(best.count_params()),
    }
    register(root, args.version, best, metadata, report, promote=args.promote)
    return 0


def register(root: Path, version: str, model, metadata: dict, report: dict, promote: bool = False) -> Path:
    """Save the model, its PublicTest artefacts and metadata as the new version
    <root>/<version>, and serve it if ``promote``."""

    def fill(folder: Path) -> None:
        model.save(folder / registry.MODEL_FILE)
        evaluate.write_artefacts(report, folder, datasets.VAL, f"{version} [{datasets.VAL}]")
        write_json(folder / registry.METADATA_FILE, metadata)

    path = registry.build_version(root, version, fill)
    print(f"registered {path}")
    if promote:
        registry.promote(root, version)
        print(f"promoted {version}: {root / registry.CURRENT}")
    return path
