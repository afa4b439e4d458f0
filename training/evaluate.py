"""Evaluation: metrics in plain numpy, a confusion-matrix plot, and inference speed.

Models run through the classifier service's own :class:`InferenceRunner` (a compiled
``model(x, training=False)``, padded batches), so the scores and faces/s reported here
are those of the served model -- not of ``model.predict``, whose ~55 ms per-call
overhead would swamp batch-1 latency.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.common.protocol import EMOTIONS
from services.model import registry
from services.model.preprocess import InputSpec
from services.model.runtime import InferenceRunner, RuntimeUnavailable

from .data import ALL, VAL, Split, load_dataset, load_ferplus, model_inputs, with_majority

BATCH = 64


# --- metrics (numpy only) --------------------------------------------------------------


def confusion_matrix(y_true, y_pred, n_classes: int = len(EMOTIONS)) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def metrics_from_confusion(cm: np.ndarray, class_names=EMOTIONS) -> dict:
    """Accuracy, macro-F1 (over classes with support) and per-class P/R/F1/support."""
    cm = np.asarray(cm, np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    n = int(cm.sum())
    present = support > 0
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
    }


# --- running the model -----------------------------------------------------------------


def predict(runner: InferenceRunner, split: Split, batch_size: int = BATCH) -> np.ndarray:
    """Class probabilities for every face of ``split``, with the runner's TTA."""
    out = []
    for start in range(0, len(split), batch_size):
        out.append(runner.predict_inputs(model_inputs(split.faces[start : start + batch_size], runner.spec)))
    return np.concatenate(out) if out else np.empty((0, len(EMOTIONS)), np.float32)


def measure_speed(runner: InferenceRunner, seconds: float = 2.0) -> dict:
    """Faces per second at batch 1 and batch 64, each timed for about ``seconds``."""
    speeds = {}
    rng = np.random.default_rng(0)
    for batch in (1, BATCH):
        x = rng.random((batch, *runner.spec.shape), dtype=np.float32)
        for _ in range(3):  # trace + warm caches
            runner.predict_inputs(x)
        calls, start = 0, time.perf_counter()
        while True:
            runner.predict_inputs(x)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        speeds[f"batch_{batch}"] = round(calls * batch / elapsed, 1)
    return speeds


def evaluate_split(
    model,
    spec: InputSpec,
    split: Split,
    *,
    tta: str = "none",
    bench_seconds: float = 2.0,
    runtime: str = "tf-function",
    precision: str = "float32",
) -> dict:
    runner = InferenceRunner(model, spec, runtime=runtime, tta=tta, precision=precision)
    report = _report(split, predict(runner, split))
    report["tta"] = tta
    report["runtime"] = runtime
    report["precision"] = runner.precision  # the one really used
    if runner.precision_fallback:
        report["precision_fallback"] = runner.precision_fallback
        report["asked_precision"] = runner.asked_precision
    if bench_seconds > 0:
        report["speed_faces_per_s"] = measure_speed(runner, bench_seconds)
    return report


def evaluate_ensemble(
    members: list[tuple[str, InferenceRunner]], split: Split, *, bench_seconds: float = 2.0
) -> dict:
    """Scores of several models' mean probabilities, e.g. to choose ``train --teacher``s.
    Each member runs with its own TTA and precision; the speed is that of running them
    one after the other."""
    report = _report(split, np.mean([predict(runner, split) for _, runner in members], axis=0))
    report["members"] = [
        {"version": name, "tta": runner.tta, "precision": runner.precision} for name, runner in members
    ]
    if bench_seconds > 0:
        speeds = [measure_speed(runner, bench_seconds) for _, runner in members]
        report["speed_faces_per_s"] = {
            key: round(1 / sum(1 / s[key] for s in speeds), 1) for key in speeds[0]
        }
    return report


def _report(split: Split, probs: np.ndarray) -> dict:
    """Scores against the split's labels and, where it knows them, its FER+ majorities
    (the faces without one are left out of that figure and counted)."""
    predicted = probs.argmax(axis=1)
    report = metrics_from_confusion(confusion_matrix(split.labels, predicted))
    if split.majority is not None:
        scored = split.majority >= 0
        report[FERPLUS] = {
            **metrics_from_confusion(confusion_matrix(split.majority[scored], predicted[scored])),
            "left_out": int((~scored).sum()),
        }
    return report


FERPLUS = "ferplus_majority"  # the report's section scored against the FER+ majority


def summary(report: dict, split: str) -> dict:
    """The headline numbers a version's metadata.json keeps from a report."""
    out = {
        "split": split,
        "n": report["n"],
        "accuracy": report["accuracy"],
        "macro_f1": report["macro_f1"],
        "speed_faces_per_s": report.get("speed_faces_per_s"),
    }
    if FERPLUS in report:
        fp = report[FERPLUS]
        out[FERPLUS] = {k: fp[k] for k in ("n", "left_out", "accuracy", "macro_f1")}
    return out


# --- presenting ------------------------------------------------------------------------


def format_report(report: dict) -> str:
    lines = [f"{'class':<10}{'precision':>10}{'recall':>8}{'f1':>8}{'support':>9}"]
    for name, m in report["per_class"].items():
        lines.append(f"{name:<10}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>8.3f}{m['support']:>9d}")
    served = (
        ""
        if "members" in report
        else f"   tta {report.get('tta', 'none')}   runtime {report.get('runtime', 'tf-function')}"
        f"   precision {report.get('precision', 'float32')}"
    )
    lines.append(
        f"accuracy {report['accuracy']:.4f}   macro-F1 {report['macro_f1']:.4f}   n {report['n']}{served}"
    )
    if FERPLUS in report:
        fp = report[FERPLUS]
        lines.append(
            f"FER+ majority: accuracy {fp['accuracy']:.4f}   macro-F1 {fp['macro_f1']:.4f}   "
            f"n {fp['n']} ({fp['left_out']} without a majority class of ours left out)"
        )
    if report.get("precision_fallback"):
        lines.append(
            f"{report.get('asked_precision', 'bfloat16')} was asked for, float32 used: "
            f"{report['precision_fallback']}"
        )
    lines.append("confusion matrix (rows true, columns predicted):")
    lines.append(" " * 10 + "".join(f"{name[:7]:>8}" for name in EMOTIONS))
    for name, row in zip(EMOTIONS, report["confusion_matrix"]):
        lines.append(f"{name:<10}" + "".join(f"{v:>8d}" for v in row))
    speed = report.get("speed_faces_per_s")
    if speed:
        lines.append(
            f"speed: {speed['batch_1']:.0f} faces/s at batch 1, "
            f"{speed[f'batch_{BATCH}']:.0f} faces/s at batch {BATCH}"
        )
    return "\n".join(lines)


def save_confusion_png(report: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(report["confusion_matrix"], np.float64)
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{rows[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rows[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=45)
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_artefacts(report: dict, directory: Path, split: str, title: str) -> None:
    """eval-<split>.json and confusion-<split>.png, the names the registry documents."""
    report = {"split": split, **report}
    registry.atomic_write(directory / f"eval-{split}.json", json.dumps(report, indent=1) + "\n")
    save_confusion_png(report, directory / f"confusion-{split}.png", title)


# --- the command -----------------------------------------------------------------------


@dataclass
class FileEntry(registry.ModelEntry):
    """A model file other than <version>/model.keras, e.g. a run's best.keras."""

    file: Path | None = None

    @property
    def model_file(self) -> Path:
        return self.file


def resolve_model(ref: str, root: Path) -> registry.ModelEntry:
    """``current``, a registry version name, a version directory, or a .keras file with
    metadata.json beside it."""
    if ref == registry.CURRENT:
        return registry.resolve(root)
    path = Path(ref)
    if "/" not in ref and (root / ref).is_dir():
        return registry.resolve(root, ref)
    if path.is_dir():
        return registry.read_entry(path)
    if path.is_file():
        meta = path.parent / registry.METADATA_FILE
        if not meta.is_file():
            raise registry.RegistryError(
                f"{path}: no {registry.METADATA_FILE} beside the model, so its input spec "
                f"(size, channels, scaling) is unknown; evaluate a registry version instead"
            )
        try:
            metadata = json.loads(meta.read_text())
        except json.JSONDecodeError as exc:
            raise registry.RegistryError(f"{meta}: not valid JSON ({exc})") from None
        return FileEntry(str(metadata.get("version", path.stem)), path.parent, metadata, file=path)
    if path.suffix == ".keras" or "/" in ref:
        raise registry.RegistryError(f"{ref}: no such model file or directory")
    return registry.resolve(root, ref)


def run(args) -> int:
    entries = [resolve_model(ref, Path(args.registry)) for ref in args.model]
    models = [registry.load_checked(entry) for entry in entries]
    files = " + ".join(str(entry.model_file) for entry in entries)
    dataset = load_dataset(args.data, args.data_format, args.val_split, args.seed)
    args.split = args.split or (ALL if dataset.pooled else VAL)
    split = dataset.split(args.split)
    if args.ferplus:
        split = with_majority(split, load_ferplus(args.ferplus, args.split))
    try:
        if len(entries) == 1:
            entry = entries[0]
            report = evaluate_split(
                models[0],
                entry.spec,
                split,
                tta=args.tta or entry.tta,
                bench_seconds=args.bench_seconds,
                runtime=args.runtime,
                precision=args.precision or entry.precision,
            )
        else:
            members = [
                (
                    entry.version,
                    InferenceRunner(
                        model,
                        entry.spec,
                        runtime=args.runtime,
                        tta=args.tta or entry.tta,
                        precision=args.precision or entry.precision,
                    ),
                )
                for entry, model in zip(entries, models)
            ]
            report = evaluate_ensemble(members, split, bench_seconds=args.bench_seconds)
    except RuntimeUnavailable as exc:
        raise registry.RegistryError(f"{files}: --runtime {args.runtime}: {exc}") from None
    name = " + ".join(entry.version for entry in entries)
    report = {"model": files, "version": name, "data": str(args.data), "split": args.split, **report}
    print(f"{name} on {args.data} [{args.split}]: n = {len(split)} faces")
    if len(entries) > 1:
        print(
            "mean probabilities of "
            + ", ".join(f"{m['version']} (tta {m['tta']}, {m['precision']})" for m in report["members"])
        )
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        registry.atomic_write(Path(args.json), json.dumps(report, indent=1) + "\n")
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        save_confusion_png(report, Path(args.png), f"{name} [{args.split}]")
    return 0
