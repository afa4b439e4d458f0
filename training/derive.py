"""A new version from an existing one, served differently: its test-time augmentation or
the precision it computes in.

Versions are immutable, so serving the same network another way is a new version: the
same weights, metadata that says ``derived_from`` and the new setting, and a PublicTest
report scored the new way -- so the numbers in the registry are always the served ones.
"""

from __future__ import annotations

from pathlib import Path

from services.model import registry
from services.model.runtime import precision_unavailable

from . import data as datasets
from . import evaluate
from .train import RunError, check_version_name, git_commit, register, utc_now


def run(args) -> int:
    root = Path(args.registry)
    check_version_name(args.version)
    if (root / args.version).exists():
        raise registry.RegistryError(
            f"version {args.version!r} already exists in {root}; "
            f"versions are never overwritten, pass another name"
        )
    source = evaluate.resolve_model(args.source, root)
    tta = args.tta or source.tta
    precision = args.precision or source.precision
    if (tta, precision) == (source.tta, source.precision):
        raise RunError(
            f"{source.version} is already served with tta {tta} and precision "
            f"{precision}; pass another --tta or --precision"
        )
    reason = precision_unavailable("auto", precision)
    if reason:
        raise RunError(f"cannot score {args.version} in {precision} here: {reason}")
    data = args.data or (source.metadata.get("dataset") or {}).get("path")
    if not data:
        raise RunError(f"{source.path / registry.METADATA_FILE} names no dataset; pass --data")
    model = registry.load_checked(source)
    # the validation split SOURCE was selected on: a folder dataset is split by its own seed
    trained = source.metadata.get("training") or {}
    dataset = datasets.load_dataset(
        data, trained.get("data_format", "auto"), trained.get("val_split", 0.1), trained.get("seed", 1234)
    )
    val = dataset.split(datasets.VAL)
    votes = args.ferplus or (trained.get("ferplus") if not args.data else None)
    if votes:  # scored against the FER+ majority too, as SOURCE's own report was
        val = datasets.with_majority(val, datasets.load_ferplus(votes, datasets.VAL, required=False))
    report = evaluate.evaluate_split(
        model,
        source.spec,
        val,
        tta=tta,
        runtime="auto",
        precision=precision,
        bench_seconds=args.bench_seconds,
    )
    print(
        f"{args.version} ({source.version} with tta {tta}, precision {precision}) on {data} [{datasets.VAL}]:"
    )
    print(evaluate.format_report(report))
    metadata = {
        **source.metadata,
        "version": args.version,
        "tta": tta,
        "precision": precision,
        "derived_from": source.version,
        "metrics": evaluate.summary(report, datasets.VAL),
        "git_commit": git_commit(),
        "created": utc_now(),
    }
    register(root, args.version, model, metadata, report, promote=args.promote)
    return 0
