"""Targets (PASS/MISS), the markdown report and the PNG plots, from the results dictionary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import FAST_DETECT_WIDTH

STAGE_COLORS = {
    "capture": "#4e79a7",
    "broker": "#f28e2b",
    "detector": "#59a14f",
    "classifier": "#e15759",
    "viewer": "#b07aa1",
}
TOPOLOGIES = ("d1c1", "d2c1", "d1c2", "d2c2")


def med(s) -> float | None:
    return None if s is None else s.get("median")


def fmt(s, digits: int = 1, scale: float = 1.0) -> str:
    """'median [min–max]' of a summary, or '—'."""
    if not s or s.get("median") is None:
        return "—"
    m, lo, hi = (s["median"] * scale, s["min"] * scale, s["max"] * scale)
    if s.get("n", 1) <= 1 or abs(hi - lo) < 10**-digits:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


# --- targets -------------------------------------------------------------------------------


def transport_share(results: dict, config: str) -> dict | None:
    """Serialization + transport CPU per frame in a pipeline configuration, two ways."""
    pipe = results.get("pipeline", {}).get("configs", {}).get(config)
    tr = results.get("transport")
    if not pipe or not tr:
        return None
    total = med(pipe["cpu_ms_per_frame"])
    stages = pipe["stages"]
    # (a) measured in the pipeline: the whole broker, every process's ZeroMQ I/O threads,
    #     plus protocol encode+decode of the messages of one frame (timed alone).
    ser = tr["serialization"]
    protocol_ms = (
        ser["frame-jpeg"]["encode_plus_decode_us"] * 2  # detector + viewer decode
        + ser["faces"]["encode_plus_decode_us"]
        + ser["result"]["encode_plus_decode_us"]
    ) / 1000
    zmq_ms = sum(med(stages[s]["zmq_io_ms_per_frame"]) or 0 for s in stages if s != "broker")
    measured = med(stages["broker"]["cpu_ms_per_frame"]) + zmq_ms + protocol_ms
    # (b) composed from the hop micro-benchmarks (producer + broker + consumer of each hop,
    #     JPEG coding excluded): detect queue + frames fan-out + faces + result.
    cases = tr["cases"]
    composed = (
        sum(med(cases[c]["transport_cpu_us"]) for c in ("frame-jpeg", "frame-jpeg-fanout", "faces", "result"))
        / 1000
    )
    # JPEG coding exists only to move frames: capture encodes, detector and viewer decode.
    jpeg_ms = (ser["jpeg_encode"]["cpu_us"] + 2 * ser["jpeg_decode"]["cpu_us"]) / 1000
    detect_classify = med(stages["detector"]["cpu_ms_per_frame"]) + med(
        stages["classifier"]["cpu_ms_per_frame"]
    )
    return {
        "config": config,
        "total_cpu_ms_per_frame": total,
        "measured_ms": measured,
        "measured_share": measured / total,
        "composed_ms": composed,
        "composed_share": composed / total,
        "jpeg_codec_ms_640x480": jpeg_ms,
        "share_with_jpeg": (max(measured, composed) + jpeg_ms) / total,
        "detect_plus_classify_ms": detect_classify,
    }


def targets(results: dict) -> list[dict]:
    out = []
    pipe = results.get("pipeline", {}).get("configs", {})
    peer = results.get("peer", {})
    raw_det = results.get("raw", {}).get("detection", {})
    # 1. pipeline frames/s >= 1.5x fer, same faces found.
    default = next((v for k, v in raw_det.items() if "default" in k), None)
    for key, label in (
        ("single-unpaced-d1c1-capacity", "capacity mode: max age 3 s"),
        ("single-unpaced-d1c1", "default settings"),
    ):
        single = pipe.get(key)
        if not single or not peer.get("fps"):
            continue
        ratio = med(single["fps"]) / med(peer["fps"])
        ours = default["frames_with_faces"] / default["frames"] if default else None
        theirs = peer["frames_with_faces"] / peer["frames"]
        in_run = med(single["frames_with_faces_fraction"])
        same = ours is not None and abs(ours - theirs) <= 0.03
        mode = key.endswith("-capacity")
        best = max(
            (
                v
                for k, v in pipe.items()
                if k.startswith("single-unpaced") and k.endswith("-capacity") == mode
            ),
            key=lambda v: med(v["fps"]),
        )
        out.append(
            {
                "target": f"pipeline frames/s ≥ 1.5× fer, unpaced, 1 face, same faces found ({label})",
                "value": f"1×1: {med(single['fps']):.1f} vs fer {med(peer['fps']):.1f} frames/s = "
                f"{ratio:.2f}× (best, {best['detectors']}×{best['classifiers']}: "
                f"{med(best['fps']) / med(peer['fps']):.2f}×); frames with a face: "
                f"detector {ours:.1%} of the clip ({in_run:.1%} of delivered frames), "
                f"fer {theirs:.1%}; CPU per frame: pipeline {med(single['cpu_ms_per_frame']):.0f} ms "
                f"(all processes) vs fer {med(peer['cpu_ms_per_frame']):.0f} ms",
                "pass": ratio >= 1.5 and same,
            }
        )
    # 1b. the same with a paced source: the best rate the pipeline sustains, per detector mode.
    fast = " ".join(results.get("pipeline", {}).get("mode_args", {}).get("fast", [])) or "fast settings"
    for mode, label in (("default", "detector defaults, --detect-width 320"), ("fast", fast)):
        sweep = {k: v for k, v in pipe.items() if k.startswith("folder-") and v["mode"] == mode}
        if not sweep or not peer.get("fps"):
            continue
        best = max(sweep.values(), key=lambda v: med(v["fps"]))
        one = [v for v in sweep.values() if v["detectors"] == 1]
        best1 = max(one, key=lambda v: med(v["fps"])) if one else best
        ratio = med(best["fps"]) / med(peer["fps"])
        raw_mode = next((v for k, v in raw_det.items() if f"({mode})" in k), None)
        ours = raw_mode["frames_with_faces"] / raw_mode["frames"] if raw_mode else None
        theirs = peer["frames_with_faces"] / peer["frames"]
        same = ours is not None and abs(ours - theirs) <= 0.03
        rates = sorted({int(k.split("-")[1][:-3]) for k in sweep})
        out.append(
            {
                "target": f"pipeline frames/s ≥ 1.5× fer, 1 face, same faces found "
                f"(source paced at {rates[0]}–{rates[-1]} fps: best sustained rate; "
                f"{label})",
                "value": f"{best['detectors']}×{best['classifiers']} at {best['pace']}: "
                f"{med(best['fps']):.1f} frames/s = {ratio:.2f}× fer "
                f"(e2e p50 {med(best['latency_ms']['p50']):.0f} ms, p99 "
                f"{med(best['latency_ms']['p99']):.0f} ms, "
                f"{med(best['cpu_ms_per_frame']):.0f} CPU ms/frame); 1×1 at {best1['pace']}: "
                f"{med(best1['fps']):.1f} = {med(best1['fps']) / med(peer['fps']):.2f}×; "
                f"frames with a face: detector {ours:.1%} of the clip, fer {theirs:.1%}",
                "pass": ratio >= 1.5 and same,
            }
        )
    # 2. latency at 30 fps, one face.
    for key, label in (("single-30fps-d1c1", "detector defaults"), ("single-30fps-d1c1-fast", fast)):
        paced = pipe.get(key)
        if not paced:
            continue
        p50, p99 = med(paced["latency_ms"]["p50"]), med(paced["latency_ms"]["p99"])
        out.append(
            {
                "target": f"e2e latency at 30 fps, 1 face: p50 ≤ 60 ms, p99 ≤ 150 ms ({label})",
                "value": f"p50 {p50:.0f} ms, p99 {p99:.0f} ms at the results subscriber "
                f"(viewer histogram: p50 {med(paced['viewer_latency_ms']['p50']) or 0:.0f} ms, "
                f"p99 {med(paced['viewer_latency_ms']['p99']) or 0:.0f} ms); "
                f"{med(paced['fps']):.1f} frames/s delivered",
                "pass": p50 <= 60 and p99 <= 150,
            }
        )
    # 3. classifier saturated vs raw runner.
    sat = results.get("classifier_saturation", {}).get("cases", {})
    if "1" in sat:
        parts = [
            f"{k} face(s)/msg: {med(v['faces_per_s_summary']):.0f} faces/s at mean batch "
            f"{med(v['mean_batch_summary']):.1f} vs raw {med(v['raw_faces_per_s_summary']):.0f} "
            f"= {med(v['ratio_summary']):.0%}"
            + (f" (per CPU-second: {med(v['cpu_ratio_summary']):.0%})" if v.get("cpu_ratio_summary") else "")
            for k, v in sat.items()
        ]
        out.append(
            {
                "target": "classifier stage ≥ 80 % of raw batched model throughput (saturated)",
                "value": "; ".join(parts),
                "pass": med(sat["1"]["ratio_summary"]) >= 0.8,
            }
        )
    # 4. serialization + transport share.
    share = transport_share(results, "single-30fps-d1c1")
    if share:
        worst = max(share["measured_share"], share["composed_share"])
        out.append(
            {
                "target": "serialization + transport ≤ 10 % of CPU per frame (30 fps, 1 face)",
                "value": f"{worst:.1%} ({max(share['measured_ms'], share['composed_ms']):.1f} of "
                f"{share['total_cpu_ms_per_frame']:.1f} ms; in-pipeline "
                f"{share['measured_share']:.1%}, from hop benchmarks "
                f"{share['composed_share']:.1%}); with JPEG coding "
                f"{share['share_with_jpeg']:.1%}",
                "pass": worst <= 0.10,
            }
        )
    return out


# --- markdown ------------------------------------------------------------------------------


def markdown(results: dict, plots: list[str]) -> str:
    m, model = results["machine"], results["model"]
    lines = [
        "# Benchmark results",
        "",
        f"Run {results['started']} ({'quick smoke run' if results['quick'] else 'full run'}), "
        f"{results['seconds'] / 60:.1f} min.",
        "",
        "## Machine",
        "",
        f"- {m.get('cpu_model', '?')}, {m['cpu_count']} cores, {m.get('memory_gib', '?')} GiB memory",
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- load average at start {m['load_average'][0]:.1f}, at end {results['load_average_end'][0]:.1f}",
        f"- model under test: **{model['version']}** — {model['source']}; {model['architecture']}, "
        f"test-time augmentation {model.get('tta', 'none')}, "
        f"precision {model.get('precision', 'float32')}",
    ]
    if results.get("shared_machine"):
        lines.append(f"- **shared machine**: {results['shared_machine']}")
    lines += [
        "",
        "All timings were taken side by side in this one run; figures are medians over "
        "repeats with [min–max].",
        "",
    ]
    lines += ["## Targets", "", "| target | result | |", "|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['value']} | **{'PASS' if t['pass'] else 'MISS'}** |")
    pipe = results.get("pipeline", {})
    if pipe.get("configs"):
        lines += [
            "",
            "## Pipeline (real processes)",
            "",
            f"{pipe['repeats']} repeat(s) of a {pipe['window_s']:.0f} s window after "
            f"{pipe['warmup_s']:.0f} s warm-up. Latency: wall-clock arrival at a results "
            "subscriber minus the capture timestamp; viewer: its "
            "`emotion_e2e_latency_seconds` histogram (capture → composited frame, "
            "which in live mode does not wait for the frame's own result).",
            "",
            "| clip | source | mode | det × cls | frames/s | e2e p50 ms | p95 | p99 | viewer p50 / p99 ms "
            "| faces/frame | CPU ms/frame | capture | broker | detector | classifier | viewer |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in pipe["configs"].values():
            st = c["stages"]
            lines.append(
                f"| {c['faces']} | {c['pace']} | {c['mode']} | {c['detectors']}×{c['classifiers']} "
                f"| {fmt(c['fps'])} "
                f"| {fmt(c['latency_ms']['p50'], 0)} | {fmt(c['latency_ms']['p95'], 0)} "
                f"| {fmt(c['latency_ms']['p99'], 0)} | {fmt(c['viewer_latency_ms']['p50'], 0)} / "
                f"{fmt(c['viewer_latency_ms']['p99'], 0)} | {fmt(c['faces_per_frame'], 2)} "
                f"| {fmt(c['cpu_ms_per_frame'])} | "
                + " | ".join(
                    fmt(st[s]["cpu_ms_per_frame"])
                    for s in ("capture", "broker", "detector", "classifier", "viewer")
                )
                + " |"
            )
    sat = results.get("classifier_saturation", {}).get("cases")
    if sat:
        lines += [
            "",
            "## Classifier saturated",
            "",
            "Pre-made faces messages of real crops pushed into the classify queue as fast "
            "as it takes them; results counted on `results`. Raw: `InferenceRunner.predict_faces` "
            "in one process at the classifier's mean batch size, measured right after each window.",
            "",
            "Faces per CPU-second compares the two at equal CPU: the classifier shares the "
            "cores with the broker and the load generator, the raw runner has them all.",
            "",
            "| faces/message | faces/s | mean batch | raw runner faces/s | ratio "
            "| classifier CPU cores | raw runner CPU cores | ratio per CPU-second |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k, v in sat.items():
            lines.append(
                f"| {k} | {fmt(v['faces_per_s_summary'], 0)} | {fmt(v['mean_batch_summary'])} "
                f"| {fmt(v['raw_faces_per_s_summary'], 0)} | {fmt(v['ratio_summary'], 2)} "
                f"| {fmt(v['cpu_cores_summary'], 2)} | {fmt(v.get('raw_cpu_cores_summary'), 2)} "
                f"| {fmt(v.get('cpu_ratio_summary'), 2)} |"
            )
    raw = results.get("raw")
    if raw:
        lines += [
            "",
            "## Raw limits (one process, no transport)",
            "",
            "| Haar detection | frames/s | CPU ms/frame | frames with a face |",
            "|---|---|---|---|",
        ]
        for name, d in raw["detection"].items():
            lines.append(
                f"| {name} | {fmt(d['fps_summary'])} | {fmt(d['cpu_ms_per_frame_summary'], 2)} "
                f"| {d['frames_with_faces']}/{d['frames']} |"
            )
        mdl = raw["model"]
        lines += [
            "",
            f"Model faces/s on {mdl['crops']} real crops from the clip "
            f"(input {mdl['input']['size']}×{mdl['input']['size']}×{mdl['input']['channels']}). "
            "`runner.predict_faces` is what the classifier runs (preprocessing + padded "
            "`tf.function`); the others take ready model inputs.",
            "",
            "| runtime | " + " | ".join(f"batch {b}" for b in mdl["batches"]) + " |",
            "|---|" + "---|" * len(mdl["batches"]),
        ]
        for name, per in mdl["runtimes"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(fmt(per[str(b)]["faces_per_s_summary"], 0) for b in mdl["batches"])
                + " |"
            )
        tfl = mdl.get("tflite", {})
        lines.append("")
        lines.append(
            f"TFLite: converted with {tfl['how']}, max |difference| from Keras "
            f"{tfl['max_abs_diff_vs_keras']:.1e}."
            if tfl.get("converted")
            else f"TFLite: skipped ({tfl.get('skipped', '?')})."
        )
    peer = results.get("peer")
    if peer and not peer.get("skipped"):
        lines += [
            "",
            "## The fer package",
            "",
            f"fer {peer['fer_version']} (TensorFlow {peer['tensorflow']}, OpenCV {peer['opencv']}) "
            f"in its own environment: {peer['settings']}, per frame on the decoded clip "
            f"({peer['frame_shape'][1]}×{peer['frame_shape'][0]}); one run before each "
            "pipeline repeat, so both see the same machine load.",
            "",
            "| frames/s | per-frame p50 ms | p95 ms | CPU ms/frame | frames with a face | faces |",
            "|---|---|---|---|---|---|",
            f"| {fmt(peer['fps'])} | {fmt(peer['latency_p50_ms'])} | {fmt(peer['latency_p95_ms'])} "
            f"| {fmt(peer['cpu_ms_per_frame'])} | {peer['frames_with_faces']}/{peer['frames']} "
            f"| {peer['faces']} |",
        ]
    elif peer:
        lines += ["", "## The fer package", "", f"Skipped: {peer['skipped']}"]
    tr = results.get("transport")
    if tr:
        lines += [
            "",
            "## Transport (producer → broker → consumer, separate processes)",
            "",
            f"{tr['messages_per_run']} messages at {tr['rate_per_s']:.0f}/s per run, frames "
            f"{tr['frame_size']}. CPU per message from `time.process_time` on each side (ZeroMQ's "
            "I/O thread included) and /proc for the broker; consumer CPU includes the image "
            "decode, producer CPU the JPEG encode (also shown alone).",
            "",
            "| case | channel | latency p50 ms | p99 ms | producer µs | (JPEG encode) | broker µs "
            "| consumer µs | (image decode) | hop µs without codec |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case, c in tr["cases"].items():
            lines.append(
                f"| {case} | {c['channel']} | {fmt(c['latency_p50_ms'], 2)} | {fmt(c['latency_p99_ms'], 2)} "
                f"| {fmt(c['producer_cpu_us'], 0)} | {fmt(c['producer_jpeg_encode_us'], 0)} "
                f"| {fmt(c['broker_cpu_us'], 0)} | {fmt(c['consumer_cpu_us'], 0)} "
                f"| {fmt(c['consumer_image_decode_us'], 0)} | {fmt(c['transport_cpu_us'], 0)} |"
            )
        ser = tr["serialization"]
        lines += [
            "",
            "Serialization alone (`protocol.encode` + `decode`, CPU µs per message): "
            + ", ".join(
                f"{k} {v['encode_plus_decode_us']:.1f} (header {v['header_bytes']} B)"
                for k, v in ser.items()
                if isinstance(v, dict) and "encode_plus_decode_us" in v
            )
            + f"; JPEG 640×480 encode {ser['jpeg_encode']['cpu_us']:.0f} µs, decode "
            f"{ser['jpeg_decode']['cpu_us']:.0f} µs ({ser['jpeg_bytes'] // 1024} KiB vs 900 KiB raw).",
        ]
        for config in ("single-30fps-d1c1", "single-unpaced-d1c1"):
            share = transport_share(results, config)
            if share:
                lines.append(
                    f"\nIn the pipeline ({config}): {share['total_cpu_ms_per_frame']:.1f} CPU ms per frame "
                    f"in all; serialization + transport {share['measured_ms']:.2f} ms measured there "
                    f"(broker + ZeroMQ I/O threads + protocol) = {share['measured_share']:.1%}, "
                    f"{share['composed_ms']:.2f} ms composed from the hop benchmarks = "
                    f"{share['composed_share']:.1%}; JPEG coding adds about "
                    f"{share['jpeg_codec_ms_640x480']:.1f} ms "
                    f"at 640×480; detection + classification take {share['detect_plus_classify_ms']:.1f} ms."
                )
    notes = list(results.get("notes", []))
    if "tiny" in model.get("source", ""):
        notes.append(
            "No trained model was promoted in `models/`, so the classifier served a tiny "
            "randomly initialised CNN: model time is a small share of the classifier's "
            "work here, and the classifier numbers mostly measure its per-message overhead. "
            "A real model moves the balance towards inference."
        )
    notes.append(
        "Modes: *default* runs the services with their own settings (the detector works "
        "on the newest waiting frame, stages drop frames older than 0.5 s). *capacity* "
        "raises --max-age-ms to 3 s in the detector and classifier, to show what the "
        "stages can process when nothing is dropped for age. *fast* runs the detector "
        f"at --detect-width {FAST_DETECT_WIDTH} instead of 320 (about half the Haar work; the smallest "
        "face it finds is 10 % of the frame width instead of 7.5 %; the raw detection "
        "table shows the faces found at each width) and the classifier with "
        "--runtime tflite."
    )
    notes.append(
        "An unpaced source reads the clip as fast as it can; capture and the viewer then "
        "spend CPU on frames that the detector never takes, which the per-frame CPU "
        "figures (CPU per delivered frame) include."
    )
    lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------


def save_plot(fig, out: Path, name: str) -> str:
    """Lay out, write and close one figure; returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    configs = results.get("pipeline", {}).get("configs", {})
    fer = med(results.get("peer", {}).get("fps"))

    if configs:
        # Throughput vs replicas.
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.38
        for i, (clip, label) in enumerate((("single", "1 face"), ("tiled", "4 faces"))):
            xs, ys, lo, hi = [], [], [], []
            for j, topo in enumerate(TOPOLOGIES):
                c = configs.get(f"{clip}-unpaced-{topo}-capacity")
                if c:
                    xs.append(j + (i - 0.5) * width)
                    ys.append(c["fps"]["median"])
                    lo.append(c["fps"]["median"] - c["fps"]["min"])
                    hi.append(c["fps"]["max"] - c["fps"]["median"])
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=f"pipeline, {label}")
        if fer:
            ax.axhline(fer, color="k", ls="--", lw=1, label=f"fer package, 1 face ({fer:.0f})")
        ax.set_xticks(range(len(TOPOLOGIES)), [f"{t[1]} det × {t[3]} cls" for t in TOPOLOGIES])
        ax.set_ylabel("frames/s (unpaced source)")
        ax.set_title("Throughput vs replicas (capacity mode: max age 3 s)")
        ax.legend(fontsize=8)
        made.append(save_plot(fig, out, "throughput_vs_replicas.png"))

    # Sustained throughput: delivered vs offered frames/s (image-folder source).
    sweep = {k: v for k, v in configs.items() if k.startswith("folder-")}
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        for topo in sorted({(v["mode"], v["detectors"], v["classifiers"]) for v in sweep.values()}):
            rows = sorted(
                (
                    (int(k.split("-")[1][:-3]), v)
                    for k, v in sweep.items()
                    if (v["mode"], v["detectors"], v["classifiers"]) == topo
                ),
                key=lambda r: r[0],
            )
            xs = [r[0] for r in rows]
            ys = [r[1]["fps"]["median"] for r in rows]
            err = [
                [r[1]["fps"]["median"] - r[1]["fps"]["min"] for r in rows],
                [r[1]["fps"]["max"] - r[1]["fps"]["median"] for r in rows],
            ]
            ax.errorbar(
                xs,
                ys,
                yerr=err,
                marker="o",
                capsize=3,
                label=f"pipeline {topo[1]} det × {topo[2]} cls"
                + ("" if topo[0] == "default" else f" ({topo[0]})"),
            )
        if xs:
            ax.plot([0, max(xs)], [0, max(xs)], color="grey", lw=0.8, ls=":", label="offered")
        if fer:
            ax.axhline(fer, color="k", ls="--", lw=1, label=f"fer package ({fer:.0f})")
            ax.axhline(1.5 * fer, color="r", ls=":", lw=1, label="1.5× fer")
        ax.set_xlabel("offered frames/s (source paced)")
        ax.set_ylabel("delivered frames/s")
        ax.set_title("Sustained throughput, 1 face")
        ax.legend(fontsize=8)
        made.append(save_plot(fig, out, "sustained_throughput.png"))

    if configs:
        # Latency CDF per configuration.
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for c in configs.values():
            values = np.sort([v for r in c["runs"] for v in r["latencies_ms"]])
            if len(values):
                ax.plot(
                    values,
                    np.arange(1, len(values) + 1) / len(values),
                    lw=1.2,
                    label=f"{c['faces']}, {c['pace']}, {c['detectors']}×{c['classifiers']}"
                    + ("" if c["mode"] == "default" else f" ({c['mode']})"),
                )
        ax.set_xscale("log")
        ax.axvline(60, color="grey", ls=":", lw=1)
        ax.axvline(150, color="grey", ls=":", lw=1)
        ax.set_xlabel("capture → result at subscriber (ms, log scale)")
        ax.set_ylabel("fraction of frames")
        ax.set_title("End-to-end latency CDF")
        ax.legend(fontsize=7)
        made.append(save_plot(fig, out, "latency_cdf.png"))

        # CPU per frame, per stage.
        fig, ax = plt.subplots(figsize=(11, 5))
        keys = list(configs)
        bottom = np.zeros(len(keys))
        for stage, color in STAGE_COLORS.items():
            vals = np.array([configs[k]["stages"][stage]["cpu_ms_per_frame"]["median"] or 0 for k in keys])
            ax.bar(range(len(keys)), vals, bottom=bottom, color=color, label=stage)
            bottom += vals

        def label(c):
            pace = c["pace"].replace(" (images)", " img")
            return f"{c['faces'].split()[0]}f {pace} {c['detectors']}×{c['classifiers']}" + {
                "default": "",
                "capacity": " cap",
                "fast": " fast",
            }.get(c["mode"], f" {c['mode']}")

        ax.set_xticks(
            range(len(keys)), [label(configs[k]) for k in keys], rotation=60, ha="right", fontsize=7
        )
        ax.set_ylabel("CPU ms per delivered frame")
        ax.set_title(
            "CPU per frame by stage (f = faces per frame, img = image source, "
            f"cap = capacity mode, fast = detect width {FAST_DETECT_WIDTH} + TFLite)"
        )
        ax.legend(fontsize=8)
        made.append(save_plot(fig, out, "cpu_per_stage.png"))

    # Raw model throughput by runtime.
    mdl = results.get("raw", {}).get("model")
    if mdl:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, per in mdl["runtimes"].items():
            ax.plot(
                mdl["batches"],
                [per[str(b)]["faces_per_s_summary"]["median"] for b in mdl["batches"]],
                marker="o",
                label=name,
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("faces/s")
        ax.set_title(f"Model runtimes ({results['model']['version']})")
        ax.legend(fontsize=8)
        made.append(save_plot(fig, out, "model_runtimes.png"))
    return made


def render(folder: Path) -> None:
    """Rewrite results.md and the plots of a results folder from its results.json."""
    import json

    results = json.loads((folder / "results.json").read_text())
    results["targets"] = targets(results)
    (folder / "results.md").write_text(markdown(results, plots(results, folder)))


if __name__ == "__main__":  # python -m bench.report [bench/results]
    import sys

    render(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results"))
