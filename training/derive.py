"""A new version from an existing one, served differently (today: its test-time augmentation).

Versions are immutable, so serving the same network another way is a new version: the
same weights, metadata that says ``derived_from`` and the new setting, and a PublicTest
report scored the new way -- so the numbers in the registry are always the served ones.
"""
from __future__ import annotations

from pathlib import Path

from services.common import registry

from . import data as datasets
from . import evaluate
from .train import RunError, check_version_name, git_commit, register, utc_now


def run(args) -> int:
    root = Path(args.registry)
    check_version_name(args.version)
    if (root / args.version).exists():
        raise registry.RegistryError(f"version {args.version!r} already exists in {root}; "
                                     f"versions are never overwritten, pass another name")
    source = evaluate.resolve_model(args.source, root)
    data = args.data or (source.metadata.get("dataset") or {}).get("path")
    if not data:
        raise RunError(f"{source.path / registry.METADATA_FILE} names no dataset; pass --data")
    model = registry.load_checked(source)
    # the validation split SOURCE was selected on: a folder dataset is split by its own seed
    trained = source.metadata.get("training") or {}
    dataset = datasets.load_dataset(data, trained.get("data_format", "auto"),
                                    trained.get("val_split", 0.1), trained.get("seed", 1234))
    val = dataset.split(datasets.VAL)
    report = evaluate.evaluate_split(model, source.spec, val, tta=args.tta,
                                     bench_seconds=args.bench_seconds)
    print(f"{args.version} ({source.version} with tta {args.tta}) on {data} [{datasets.VAL}]:")
    print(evaluate.format_report(report))
    metadata = {**source.metadata, "version": args.version, "tta": args.tta,
                "derived_from": source.version, "metrics": evaluate.summary(report, datasets.VAL),
                "git_commit": git_commit(), "created": utc_now()}
    register(root, args.version, model, metadata, report, promote=args.promote)
    return 0
