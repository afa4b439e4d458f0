"""The training command line (``python -m training <command>``): parsing only; the work
is in the modules.

TensorFlow is imported only by the command that needs it, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from services.model.preprocess import NORMALISATIONS
from services.model.registry import PRECISIONS, TTA_MODES
from services.model.runtime import RUNTIMES

DEFAULT_REGISTRY = os.environ.get("EMOTION_REGISTRY", "models")


def _registry_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry",
        default=DEFAULT_REGISTRY,
        help="model registry directory (default: $EMOTION_REGISTRY or 'models'; now %(default)s)",
    )


def _new_version_options(parser: argparse.ArgumentParser) -> None:
    """What every command that registers a version takes."""
    parser.add_argument("--promote", action="store_true", help="promote the new version when done")
    parser.add_argument(
        "--bench-seconds",
        type=float,
        default=2.0,
        help="time spent measuring inference speed at the end (0 = skip)",
    )
    _registry_option(parser)


def _data_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--data",
        required=required,
        help="FER2013-style CSV (emotion,pixels,Usage) or a folder of class folders",
    )
    parser.add_argument(
        "--data-format",
        choices=("auto", "csv", "folders"),
        default="auto",
        help="default: csv for a file, folders for a directory",
    )
    parser.add_argument(
        "--val-split",
        type=float,
        default=0.1,
        help="for a folder dataset without split folders: seeded, stratified "
        "fraction held out as the PublicTest split (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="random seed (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train, evaluate and manage the 7-class facial-emotion models "
        "(Angry, Disgust, Fear, Happy, Sad, Surprise, Neutral). See docs/models.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser(
        "train",
        help="train a model and register it as a new version",
        description="Train on the Training split, select the best epoch on PublicTest "
        "(or the --val-split fraction of a folder dataset), then register the best "
        "model as <registry>/<version>. Checkpoints go to --out-dir every epoch; "
        "--resume continues an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_options(t, required=False)
    t.add_argument(
        "--arch",
        choices=("compact", "mobilenetv2"),
        default="compact",
        help="compact: small CNN for real time on a CPU, 48x48 grey; "
        "mobilenetv2: ImageNet-style backbone, RGB",
    )
    t.add_argument("--input-size", type=int, help="input side in pixels (compact 48, mobilenetv2 224)")
    t.add_argument("--width", type=float, default=1.0, help="compact: filter-count multiplier")
    t.add_argument("--dropout", type=float, default=0.4, help="dropout before the classifier")
    t.add_argument(
        "--weights",
        default="none",
        help="mobilenetv2 backbone weights: imagenet, none, or PATH to a no-top .h5",
    )
    t.add_argument(
        "--init-from",
        metavar="MODEL",
        help="start from this model's weights (a registry version, version directory "
        "or .keras file of the same architecture, width and input) instead of "
        "random ones: fine-tuning, or a second cosine cycle for an underfit model",
    )
    t.add_argument(
        "--teacher",
        action="append",
        metavar="MODEL",
        help="knowledge distillation: also learn from this model's probabilities "
        "(averaged with its mirror image) on the training faces; repeat the "
        "option for an ensemble of teachers",
    )
    t.add_argument(
        "--teacher-weight",
        type=float,
        default=0.7,
        help="share of each target taken from the teachers; the rest is the label",
    )
    t.add_argument(
        "--teacher-temperature",
        type=float,
        default=1.0,
        help="soften the teachers' probabilities as p^(1/T), renormalised; raise "
        "it for teachers that are very sure of the training faces",
    )
    t.add_argument(
        "--ferplus",
        metavar="CSV",
        help="FER+ vote counts for the Training rows of a FER2013 CSV, in its order "
        "(Usage, Image name, neutral, ..., NF): learn from the taggers' vote "
        "shares mixed with the FER2013 labels",
    )
    t.add_argument(
        "--ferplus-weight",
        type=float,
        default=0.5,
        help="share of each target taken from the FER+ votes; the rest is the label",
    )
    t.add_argument(
        "--ferplus-majority",
        action="store_true",
        help="with --ferplus: learn each face's FER+ majority class alone (no vote shares, "
        "no FER2013 label); faces whose majority is contempt, unknown, not a face or tied "
        "are left out",
    )
    t.add_argument(
        "--normalisation",
        choices=NORMALISATIONS,
        default="none",
        help="contrast normalisation of every face at the model's size, in training, "
        "evaluation and serving alike (stored in the version's input spec)",
    )
    t.add_argument(
        "--keep-not-faces",
        action="store_true",
        help="with --ferplus: keep the faces most taggers marked 'not a face'",
    )
    t.add_argument("--epochs", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine decay)")
    t.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW decoupled weight decay")
    t.add_argument("--warmup-epochs", type=float, default=2.0, help="linear LR warm-up")
    t.add_argument("--label-smoothing", type=float, default=0.1)
    t.add_argument(
        "--balance",
        choices=("none", "oversample", "class-weights"),
        default="none",
        help="counter class imbalance by repeating minority classes or weighting the loss",
    )
    t.add_argument(
        "--patience", type=int, default=10, help="early stopping: epochs without a better validation accuracy"
    )
    t.add_argument(
        "--folds",
        type=int,
        metavar="N",
        help="split Training into N fixed, stratified folds and train on all but "
        "--holdout-fold: N such runs are cross-fitted teachers, each answering "
        "--teacher only for the faces it never saw",
    )
    t.add_argument(
        "--holdout-fold", type=int, metavar="K", help="with --folds: the fold (0 to N-1) this run leaves out"
    )
    t.add_argument("--max-train", type=int, help="use a seeded random subset of N training faces")
    t.add_argument("--max-val", type=int, help="use a seeded random subset of N validation faces")
    t.add_argument("--out-dir", help="run directory for checkpoints (default runs/<version>)")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir with its saved arguments"
    )
    t.add_argument("--epochs-this-run", type=int, help="stop (resumably) after N epochs in this invocation")
    t.add_argument("--version", help="registry version name (default <arch>-<UTC time>)")
    t.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="none",
        help="how the registered version is run on each face, by the classifier and "
        "by evaluate: flip averages with the mirror image (twice the compute)",
    )
    _new_version_options(t)
    t.set_defaults(func=_train)

    e = sub.add_parser(
        "evaluate",
        help="evaluate a model on a dataset split",
        description="Accuracy, macro-F1, per-class precision/recall/F1, confusion matrix and "
        "inference speed of a model on one split.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument(
        "--model",
        required=True,
        action="append",
        help="'current', a registry version, a version directory, or a .keras file "
        "with metadata.json beside it. Repeat it to score several models' mean "
        "probabilities (an ensemble, e.g. candidate --teachers)",
    )
    _data_options(e, required=True)
    e.add_argument(
        "--split",
        choices=("Training", "PublicTest", "PrivateTest", "all"),
        help="the split to score; all: every face of the dataset. Default: all for "
        "a folder of class folders without split folders, else PublicTest. "
        "Report PrivateTest only once, for the final model",
    )
    e.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="flip: average with the horizontally mirrored face (default: the "
        "version's own 'tta' setting, none for most)",
    )
    e.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="the classifier runtime to score and time the model with (auto: the one the "
        "classifier serves it with)",
    )
    e.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bfloat16: compute in bfloat16 where the CPU does it natively; int8: int8 "
        "weights on TFLite (default: the version's own 'precision' setting, float32 for most)",
    )
    e.add_argument(
        "--ferplus",
        metavar="CSV",
        help="FER+ votes for the rows of --data, in its order: also score against each "
        "face's FER+ majority (faces whose majority is contempt, unknown, not a face or "
        "tied are left out of that figure, and counted)",
    )
    e.add_argument("--json", help="write the report as JSON here")
    e.add_argument("--png", help="write the confusion-matrix plot here")
    e.add_argument("--bench-seconds", type=float, default=2.0, help="time per speed measurement (0 = skip)")
    _registry_option(e)
    e.set_defaults(func=_evaluate)

    d = sub.add_parser(
        "derive",
        help="register VERSION: SOURCE's weights served with another --tta or --precision",
        description="Versions never change, so serving a model another way makes a new "
        "version: SOURCE's model.keras, its metadata with the new 'tta' and "
        "'precision' and 'derived_from', and a PublicTest report scored that way.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument(
        "source", help="a registry version, version directory or .keras file with metadata.json beside it"
    )
    d.add_argument("version", help="name of the new version")
    d.add_argument(
        "--tta",
        choices=TTA_MODES,
        help="flip: average with the mirror image (twice the compute); default: SOURCE's",
    )
    d.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bfloat16: half the compute on CPUs with native bfloat16 (AVX512-BF16 "
        "or AMX); elsewhere the classifier runs it in float32; int8: int8 weights on "
        "TFLite, about a fifth of float32's CPU per face; default: SOURCE's",
    )
    d.add_argument(
        "--data",
        help="the dataset to score on (default: the one SOURCE was "
        "trained on); a folder dataset is split with SOURCE's own "
        "--val-split and --seed",
    )
    d.add_argument(
        "--ferplus",
        metavar="CSV",
        help="FER+ votes for --data's rows: also score against the FER+ majority "
        "(default: the votes SOURCE was trained with, when --data is not given)",
    )
    _new_version_options(d)
    d.set_defaults(func=_derive)

    v = sub.add_parser(
        "ferplus-votes",
        help="write FER+ votes in the row order of a FER2013 CSV of the FER+ images' pixels",
        description="Match every row of --data, by its exact pixels, to a FER+ image "
        "(IMAGES/FER2013Train, FER2013Valid, FER2013Test) and write that image's votes from "
        "fer2013new.csv, in the CSV's order, for all three splits: the file --ferplus and "
        "evaluate --ferplus take. Rows that match no image get no votes.",
    )
    v.add_argument("--data", required=True, help="FER2013 CSV with the original pixels")
    v.add_argument("--fer2013new", required=True, help="fer2013new.csv of microsoft/FERPlus")
    v.add_argument("--images", required=True, help="folder holding FER2013Train, FER2013Valid, FER2013Test")
    v.add_argument("--out", required=True, help="the votes CSV to write")
    v.set_defaults(func=_ferplus_votes)

    ls = sub.add_parser("list", help="list registry versions; * marks the served one")
    _registry_option(ls)
    ls.set_defaults(func=_registry_cmd("list_cmd"))

    p = sub.add_parser("promote", help="serve VERSION (after checking it loads and answers)")
    p.add_argument("version")
    _registry_option(p)
    p.set_defaults(func=_registry_cmd("promote_cmd"))

    i = sub.add_parser(
        "import",
        help="copy the versions of another registry that this one lacks",
        description="Copy every version of SOURCE (another registry directory) that the "
        "registry lacks; versions already there are never replaced. With "
        "--promote, then serve SOURCE's current version. In Docker, "
        "/app/shipped-models holds the models bundled with the image.",
    )
    i.add_argument("source", help="registry directory to copy from")
    i.add_argument("--promote", action="store_true", help="then promote SOURCE's current version")
    _registry_option(i)
    i.set_defaults(func=_registry_cmd("import_cmd"))

    r = sub.add_parser("rollback", help="serve the previously promoted version again")
    _registry_option(r)
    r.set_defaults(func=_registry_cmd("rollback_cmd"))
    return parser


def _train(args) -> int:
    from . import train

    return train.run(args)


def _evaluate(args) -> int:
    from . import evaluate

    return evaluate.run(args)


def _derive(args) -> int:
    from . import derive

    return derive.run(args)


def _ferplus_votes(args) -> int:
    from . import ferplus

    return ferplus.run(args)


def _registry_cmd(name: str):
    def run(args) -> int:
        from . import registry_commands

        return getattr(registry_commands, name)(args)

    return run


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that are the user's to fix: one line, no traceback."""
    from services.model.registry import RegistryError

    from .data import DataError

    errors = [RegistryError, DataError]
    if "training.models" in sys.modules:
        errors.append(sys.modules["training.models"].ModelError)
    if "training.train" in sys.modules:
        errors.append(sys.modules["training.train"].RunError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose = 1 if sys.stdout.isatty() else 2  # progress bars on a terminal, lines in logs
    try:
        return args.func(args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
