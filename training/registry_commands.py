"""The registry commands (list, promote, rollback, import): thin wrappers over
services.model.registry."""

from __future__ import annotations

from pathlib import Path

from services.model import registry


def _metric(entry: registry.ModelEntry, key: str) -> str:
    value = (entry.metadata.get("metrics") or {}).get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


def list_cmd(args) -> int:
    root = Path(args.registry)
    entries = registry.list_versions(root)
    if not entries:
        print(f"no versions in {root}")
        return 0
    current = registry.current_version(root)
    print(f"  {'version':<32}{'arch':<13}{'input':<12}{'val acc':>8}{'macro-F1':>9}  created")
    for entry in entries:
        meta = entry.metadata
        spec = meta.get("input") or {}
        shape = f"{spec.get('size', '?')}x{spec.get('size', '?')}x{spec.get('channels', '?')}"
        mark = "*" if entry.path.name == current else " "
        print(
            f"{mark} {entry.path.name:<32}{str(meta.get('architecture', '?')):<13}{shape:<12}"
            f"{_metric(entry, 'accuracy'):>8}{_metric(entry, 'macro_f1'):>9}  {meta.get('created', '')}"
        )
    print(f"(* = current: {current})" if current else "(no current version)")
    return 0


def promote_cmd(args) -> int:
    root = Path(args.registry)
    before = registry.current_version(root)
    entry = registry.promote(root, args.version)
    print(f"promoted {entry.version} (was {before or 'none'}) in {root}")
    return 0


def rollback_cmd(args) -> int:
    root = Path(args.registry)
    before = registry.current_version(root)
    version = registry.rollback(root)
    print(f"rolled back from {before or 'none'} to {version} in {root}")
    return 0


def import_cmd(args) -> int:
    root, source = Path(args.registry), Path(args.source)
    copied, kept = registry.import_versions(source, root)
    print(
        f"copied {len(copied)} version(s) from {source} to {root}: {', '.join(copied) or 'none'}"
        f"; already there: {', '.join(kept) or 'none'}"
    )
    if args.promote:
        version = registry.current_version(source)
        if version is None:
            raise registry.RegistryError(f"--promote: {source} has no current version")
        before = registry.current_version(root)
        registry.promote(root, version)
        print(f"promoted {version} (was {before or 'none'}) in {root}")
    return 0
