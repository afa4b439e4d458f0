"""``python -m bench.profile``: where each stage spends its CPU, before and after the
efficiency levers (the configurations of bench/efficiency.py), from py-spy.

A pipeline per configuration plays woman2.mp4 at 30 fps; py-spy samples every process of
it at once for a window, and each stage's report lists the functions with the largest
inclusive share of its samples (idle waiting left out: only samples py-spy sees running,
``--idle`` off). Writes bench/results/profile-stages.md.
"""

from __future__ import annotations

import argparse
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

from tests.support import wait_for

from . import common
from .common import RESULTS, log
from .efficiency import CONFIGS, start_pipeline, watch

TOP = 8


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            "py-spy",
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def inclusive_shares(collapsed: Path) -> tuple[int, list[tuple[str, float]]]:
    """Samples in all, and (function, share of samples whose stack holds it), largest first."""
    total, seen = 0, Counter()
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [frame for frame in stack.split(";") if "importlib" not in frame]
        for name in {frame.split(" (", 1)[0] for frame in frames}:
            if name and not name.startswith(("<", "process ", "Thread ")):
                seen[name] += n
    return total, [(name, n / max(1, total)) for name, n in seen.most_common(TOP)]


def profile_config(name: str, config: dict, registry: Path, clip: Path, work: Path, seconds: float) -> dict:
    folder = work / name.replace(", ", "-")
    pipeline, collector = start_pipeline(config, registry, folder)
    out = {}
    try:
        pipeline.start("capture", "--source", str(clip), "--stream", "profile", "--loop", *config["capture"])
        wait_for(lambda: any(r[1] == "profile" for r in collector.records[-50:]), 60, what="first results")
        if config["watched"]:
            watch(pipeline.http_port, "profile", threading.Event())
        time.sleep(5.0)
        procs = {
            s.name.split("#")[0]: (s.proc.pid, folder / f"{s.name}.txt")
            for s in pipeline.services
            if s.alive()
        }
        spies = [record(pid, seconds, path) for pid, path in procs.values()]
        for spy in spies:
            spy.wait(seconds + 30)
        for stage, (_, path) in sorted(procs.items()):
            if path.is_file():
                out[stage] = inclusive_shares(path)
    finally:
        collector.close()
        pipeline.stop()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    media = common.find_media(args.media)
    work = common.temp_dir() / "profile"
    registry, _ = common.model_registry(work)
    lines = [
        "# Where each stage spends its CPU (py-spy), before and after",
        "",
        f"woman2.mp4 at 30 fps through broker, capture, detector, classifier, tracker, "
        f"recorder and viewer; py-spy record --rate 100 on every process for "
        f"{args.seconds:.0f} s at once. Per stage: samples (running, not idle), then the "
        f"functions with the largest inclusive share of them. Configurations as in "
        f"[efficiency.md](efficiency.md).",
        "",
    ]
    for name in ("before", "after"):
        report = profile_config(name, CONFIGS[name], registry, media / common.CLIP_NAME, work, args.seconds)
        lines += [f"## {name}", ""]
        for stage, (total, shares) in report.items():
            lines.append(
                f"**{stage}** ({total} samples): "
                + ", ".join(f"{fn} {share:.0%}" for fn, share in shares[:TOP])
            )
            lines.append("")
        log(f"profiled {name}")
    path = Path(args.out) / "profile-stages.md"
    path.write_text("\n".join(lines))
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
