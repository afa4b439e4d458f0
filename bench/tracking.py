"""``python -m bench.tracking``: the tracker stage on real faces and real model answers.

The clip's frames go through the detector's and the classifier's own functions (no sockets,
so every frame is labelled and the numbers do not depend on load), then through the
tracker's :class:`Tracker`, exactly as the service runs it. Reported side by side:

* label stability on woman2.mp4 (one face), with each detector backend and with each face
  run once per frame (``--live-tta alternate``) or twice: label changes per 100 frames, raw and smoothed;
  agreement of the smoothed label with the majority of raw labels in a centred 1-second
  window; the lag from a change of that majority to the smoothed label (distribution);
  a sweep of half-life and hysteresis around the defaults;
* identity: track ids on the one-face clip, and id switches (motmetrics) on a composite of
  three real faces that move, with a scene cut (two faces swap places) half-way;
* throughput: faces per second through one tracker (one process, one core).

Writes bench/results/tracking.json and tracking.md.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from . import common
from .common import RESULTS, log

WINDOW_S = 1.0  # centred window of the raw-label majority
REAL_CHANGE_S = 1.0  # a majority change counts as real when the new label holds this long
LAG_LIMIT_S = 0.5
DETECTORS = ("haar", "blazeface")  # the first: the detector's default
LIVE_TTAS = ("alternate", "version")  # the first: the classifier's default --live-tta


# --- labelled frames ------------------------------------------------------------------------


def label_frames(
    frames: list[np.ndarray], fps: float, runner, detector: str = "haar", live_tta: str = "version"
) -> list:
    """Every frame through the detector's and the classifier's own functions, as the
    services run them: the ``detector`` backend at its defaults (regions and all), and each
    face's view chosen as ``--live-tta`` would. Returns result headers."""
    from services.classifier.live_tta import LiveTta
    from services.common.protocol import EMOTIONS, FaceResult, Faces, Result
    from services.detector.options import face_finder, parse_args
    from services.detector.service import face_crops

    finder = face_finder(parse_args(["--detector", detector]))
    views = LiveTta(live_tta, runner.tta)
    stream, headers = "clip", []
    for seq, frame in enumerate(frames):
        capture = 1_700_000_000.0 + seq / fps
        height, width = frame.shape[:2]
        faces, _ = finder.find_faces(stream, seq, capture, frame)
        results = []
        if faces:
            boxes, _, crops = face_crops(frame, faces, finder.settings)
            tta = views(Faces(stream, seq, width, height, {"capture": capture}, boxes=boxes))
            for box, scores in zip(boxes, runner.predict_faces(crops, tta)):
                best = int(np.argmax(scores))
                results.append(
                    FaceResult(tuple(box), EMOTIONS[best], float(scores[best]), [float(s) for s in scores])
                )
        headers.append(
            Result(
                stream,
                seq,
                width,
                height,
                {"capture": capture},
                boxes=[r.box for r in results],
                results=results,
                model="bench",
            )
        )
    return headers


def track_all(headers: list, settings) -> list:
    """The tracker's tracks messages for every result, in order (events left out)."""
    from services.common.protocol import KIND_TRACKS
    from services.tracker.tracks import Tracker

    tracker, out, now = Tracker(settings), [], 0.0
    for header in headers:
        tracker.add(header, now)
        now += 1.0
        out += [m for m in tracker.due(now, 0.0).messages if m.kind == KIND_TRACKS]
    return out


# --- label stability ------------------------------------------------------------------------


def main_face_labels(tracks: list) -> tuple[np.ndarray, list, list]:
    """(capture times, raw labels, smoothed labels) of the most seen track, frame by frame."""
    ids = Counter(f.track for m in tracks for f in m.results if f.track)
    main = ids.most_common(1)[0][0]
    times, raw, smoothed = [], [], []
    for m in tracks:
        for face in m.results:
            if face.track == main:
                times.append(m.timestamps["capture"])
                raw.append(face.label)
                smoothed.append(face.smoothed_label)
    return np.asarray(times), raw, smoothed


def changes_per_100(labels: list) -> float:
    return 100.0 * sum(a != b for a, b in zip(labels, labels[1:])) / max(1, len(labels))


def window_majority(times: np.ndarray, labels: list, window_s: float = WINDOW_S) -> list:
    """The most common label within +-window/2 of each frame (ties: the frame's own label)."""
    out = []
    for t, own in zip(times, labels):
        inside = [lab for tt, lab in zip(times, labels) if abs(tt - t) <= window_s / 2]
        counts = Counter(inside)
        best = max(counts.values())
        out.append(own if counts[own] == best else counts.most_common(1)[0][0])
    return out


def past_majority(times: np.ndarray, labels: list, window_s: float = WINDOW_S) -> list:
    """The most common label of the last ``window_s``: the best a filter that cannot see the
    future does with votes alone, a reference for what a causal smoother can reach."""
    out = []
    for t, own in zip(times, labels):
        counts = Counter(lab for tt, lab in zip(times, labels) if t - window_s <= tt <= t)
        best = max(counts.values())
        out.append(own if counts[own] == best else counts.most_common(1)[0][0])
    return out


def change_lags(times: np.ndarray, majority: list, smoothed: list) -> tuple[list, int]:
    """Seconds from each real change of the majority label to the smoothed label showing it
    (negative: the smoothed label was there first); and how many changes it never reached
    while that majority held."""
    lags, missed = [], 0
    for i in range(1, len(majority)):
        if majority[i] == majority[i - 1]:
            continue
        label, start = majority[i], times[i]
        end = i
        while end + 1 < len(majority) and majority[end + 1] == label:
            end += 1
        held = range(i, end + 1)
        if times[end] - start < REAL_CHANGE_S:
            continue
        if smoothed[i - 1] == label:
            # the smoothed label got there before the centred majority did
            before = [j for j in range(i - 1, -1, -1) if smoothed[j] != label]
            lags.append(float(times[before[0] + 1] - start) if before else 0.0)
            continue
        reached = next((j for j in held if smoothed[j] == label), None)
        if reached is None:
            missed += 1
        else:
            lags.append(float(times[reached] - start))
    return lags, missed


def stability(tracks: list) -> dict:
    times, raw, smoothed = main_face_labels(tracks)
    majority = window_majority(times, raw)
    lags, missed = change_lags(times, majority, smoothed)
    causal = past_majority(times, raw)
    return {
        "majority_changes_per_100": round(changes_per_100(majority), 2),
        "past_majority_reference": {
            "changes_per_100": round(changes_per_100(causal), 2),
            "agreement_with_majority": round(float(np.mean([c == m for c, m in zip(causal, majority)])), 4),
        },
        "frames": len(raw),
        "raw_changes_per_100": round(changes_per_100(raw), 2),
        "smoothed_changes_per_100": round(changes_per_100(smoothed), 2),
        "agreement_with_majority": round(float(np.mean([s == m for s, m in zip(smoothed, majority)])), 4),
        "majority_changes": len(lags) + missed,
        "lag_s": (
            {k: round(v, 3) for k, v in common.percentiles(lags, (50, 90, 100)).items()} if lags else None
        ),
        "lags_within_limit": sum(lag <= LAG_LIMIT_S for lag in lags),
        "changes_not_reached": missed,
    }


# --- identity -------------------------------------------------------------------------------


def composite_clip(frames: list[np.ndarray], portrait: np.ndarray) -> tuple[list, list]:
    """640x360 frames with three real faces that move: two copies of the clip (different
    moments, one mirrored) and a still portrait. Half-way the two clip copies swap places
    (a scene cut). Returns the frames and, per frame, each face's region and identity."""
    import cv2

    n = len(frames)
    small = [cv2.resize(f, (320, 180), interpolation=cv2.INTER_AREA) for f in frames]
    face = cv2.resize(portrait, (150, 150), interpolation=cv2.INTER_AREA)
    out, regions = [], []
    for i in range(n):
        phase = 2 * math.pi * i / 150
        canvas = np.full((360, 640, 3), 40, np.uint8)
        a = (int(20 + 20 * math.sin(phase)), int(10 + 8 * math.cos(phase)))
        b = (int(300 - 20 * math.sin(phase)), int(172 - 8 * math.cos(phase)))
        c = (int(455 + 25 * math.cos(phase)), int(15 + 10 * math.sin(phase)))
        places = {"A": a, "B": b} if i < n // 2 else {"A": b, "B": a}
        tiles = {"A": small[i], "B": small[(i + n // 2) % n][:, ::-1], "C": face}
        places["C"] = c
        frame_regions = []
        for name, (x, y) in places.items():
            tile = tiles[name]
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
            frame_regions.append((name, (x, y, tile.shape[1], tile.shape[0])))
        out.append(canvas)
        regions.append(frame_regions)
    return out, regions


def identity_metrics(tracks: list, regions: list, cut: int) -> dict:
    """motmetrics over the faces found: truth = which pasted face a box lies in, hypothesis =
    its track id. Id switches before the cut measure the tracker; at the cut, new ids."""
    import motmetrics as mm

    def owner(box, frame_regions):
        cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
        return next(
            (name for name, (x, y, w, h) in frame_regions if x <= cx < x + w and y <= cy < y + h), None
        )

    report = {}
    for part, span in (
        ("before_cut", range(0, cut)),
        ("after_cut", range(cut, len(tracks))),
        ("whole", range(len(tracks))),
    ):
        acc = mm.MOTAccumulator(auto_id=True)
        for i in span:
            faces = [f for f in tracks[i].results if owner(f.box, regions[i])]
            truth = ["ABC".index(owner(f.box, regions[i])) for f in faces]  # motmetrics: numbers
            hyp = [(int(f.track), f) for f in faces if f.track]
            dist = np.array([[0.0 if h is f else np.nan for _, h in hyp] for f in faces])
            acc.update(truth, [h for h, _ in hyp], dist.reshape(len(faces), len(hyp)))
        summary = mm.metrics.create().compute(
            acc, metrics=["num_switches", "num_frames", "num_unique_objects", "idf1"]
        )
        row = summary.iloc[0]
        report[part] = {
            "id_switches": int(row["num_switches"]),
            "frames": int(row["num_frames"]),
            "faces": int(row["num_unique_objects"]),
            "idf1": round(float(row["idf1"]), 4),
        }
    report["track_ids"] = len({f.track for m in tracks for f in m.results if f.track})
    return report


# --- throughput -----------------------------------------------------------------------------


def throughput(settings, seconds: float, faces_per_frame: int = 4, streams: int = 8) -> dict:
    """Faces per second through one Tracker: moving faces on several streams, messages built."""
    from services.common.protocol import EMOTIONS, FaceResult, Result, encode
    from services.tracker.tracks import Tracker

    rng = np.random.default_rng(0)
    tracker = Tracker(settings)
    faces = done = 0
    seq = 0
    started = time.perf_counter()
    cpu = time.process_time()
    while time.perf_counter() - started < seconds:
        for s in range(streams):
            results = []
            for k in range(faces_per_frame):
                x = 20 + 150 * k + (seq % 50)
                scores = rng.dirichlet(np.ones(7)).tolist()
                best = int(np.argmax(scores))
                results.append(FaceResult((x, 100, 80, 80), EMOTIONS[best], scores[best], scores))
            header = Result(
                f"cam-{s}",
                seq,
                1280,
                720,
                {"capture": seq / 30},
                boxes=[r.box for r in results],
                results=results,
                model="bench",
            )
            tracker.add(header, seq / 30)
            faces += faces_per_frame
        for message in tracker.due(seq / 30 + settings.reorder_s, 0.0).messages:
            encode(message)
            done += 1
        seq += 1
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "faces_per_s": round(faces / wall),
        "faces_per_cpu_s": round(faces / cpu),
        "messages": done,
        "faces_per_frame": faces_per_frame,
        "streams": streams,
    }


# --- the run --------------------------------------------------------------------------------


def sweep(headers: list, base) -> list[dict]:
    from dataclasses import replace

    from services.tracker.smoothing import SmoothingSettings

    rows = []
    for half_life in (0.2, 0.3, 0.4, 0.6):
        for hysteresis in (0.0, 0.15, 0.3, 0.5):
            settings = replace(base, smoothing=SmoothingSettings(half_life, hysteresis))
            row = stability(track_all(headers, settings))
            rows.append({"half_life_s": half_life, "hysteresis": hysteresis, **row})
    return rows


def write_markdown(path: Path, r: dict) -> None:
    s, ident = r["stability"], r["identity"]
    lines = [
        "# Tracker benchmark",
        "",
        f"Model `{r['model']['version']}`; clip {r['clip']} ({s['frames']} frames with the face); "
        f"{r['started']}. Defaults: half-life {r['settings']['half_life_s']} s, hysteresis "
        f"{r['settings']['hysteresis']}.",
        "",
        "## Label stability (woman2.mp4, every frame labelled)",
        "",
        "Each frame through the detector's backend at its defaults (regions and all) and the "
        "classifier's model; *alternate* runs each face once, as is and mirrored on alternate "
        "frames (the classifier's default --live-tta), *version* both views on every frame.",
        "",
        "| detector | live-tta | raw changes /100 | smoothed /100 | agrees with the 1 s centred "
        "raw majority | majority changes /100 | lag p50 s | lag max s | not reached |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["setups"]:
        lag = row["lag_s"] or {}
        lines.append(
            f"| {row['detector']} | {row['live_tta']} | {row['raw_changes_per_100']} | "
            f"{row['smoothed_changes_per_100']} | {row['agreement_with_majority']:.1%} | "
            f"{row['majority_changes_per_100']} | {lag.get('p50', '-')} | {lag.get('p100', '-')} | "
            f"{row['changes_not_reached']} |"
        )
    lines += [
        "",
        f"First row (the defaults): the past second's majority (what a filter that cannot see "
        f"ahead could vote) changes {s['past_majority_reference']['changes_per_100']} times per "
        f"100 frames and agrees with the centred one on "
        f"{s['past_majority_reference']['agreement_with_majority']:.1%} of frames. A real change "
        f"of the majority is a new label held >= {REAL_CHANGE_S} s; lag is from it to the "
        f"smoothed label (limit {LAG_LIMIT_S} s).",
    ]
    for detector, rows in r["sweep"].items():
        lines += [
            "",
            f"### Sweep: {detector}, live-tta {r['setups'][0]['live_tta']}",
            "",
            "| half-life s | hysteresis | raw /100 | smoothed /100 | agreement | lag p50 s | lag max s "
            "| not reached |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            lag = row["lag_s"] or {}
            lines.append(
                f"| {row['half_life_s']} | {row['hysteresis']} | {row['raw_changes_per_100']} | "
                f"{row['smoothed_changes_per_100']} | {row['agreement_with_majority']:.1%} | "
                f"{lag.get('p50', '-')} | {lag.get('p100', '-')} | {row['changes_not_reached']} |"
            )
    lines += [
        "",
        "## Identity",
        "",
        f"One face (woman2.mp4, {r['one_face']['seconds']} s): {r['one_face']['track_ids']} "
        f"track id(s), {r['one_face']['id_switches_per_minute']} switches per minute.",
        "",
        "Composite of three real moving faces (two copies of the clip, one mirrored, and "
        "justin.jpg), 640x360; half-way the two clip copies swap places (a scene cut):",
        "",
        "| part | frames | faces | id switches | IDF1 |",
        "|---|---|---|---|---|",
    ]
    for part in ("before_cut", "after_cut", "whole"):
        row = ident[part]
        lines.append(f"| {part} | {row['frames']} | {row['faces']} | {row['id_switches']} | {row['idf1']} |")
    lines += [
        "",
        f"Distinct track ids over the composite: {ident['track_ids']}.",
        "",
        "## Throughput (one process, one core)",
        "",
        f"{r['throughput']['faces_per_s']:,} faces/s ({r['throughput']['faces_per_cpu_s']:,} "
        f"per CPU second), {r['throughput']['faces_per_frame']} faces per frame on "
        f"{r['throughput']['streams']} streams, messages encoded.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    import cv2

    from services.tracker.tracks import TrackerSettings

    parser = argparse.ArgumentParser(prog="python -m bench.tracking", description=__doc__.splitlines()[0])
    parser.add_argument("--media", default=None, help="folder with woman2.mp4 and justin.jpg")
    parser.add_argument("--out", default=str(RESULTS), help="output folder")
    parser.add_argument("--seconds", type=float, default=10.0, help="throughput measuring time")
    args = parser.parse_args(argv)
    media = common.find_media(args.media)
    frames, fps = common.read_clip(media / common.CLIP_NAME)
    registry_dir, model = common.model_registry(common.temp_dir())
    runner, _ = common.load_runner(registry_dir)
    settings = TrackerSettings()
    result = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "clip": common.CLIP_NAME,
        "model": model,
        "machine": common.machine_info(),
        "settings": {
            "half_life_s": settings.smoothing.half_life_s,
            "hysteresis": settings.smoothing.hysteresis,
            "reorder_s": settings.reorder_s,
            "track_timeout_s": settings.track_timeout_s,
        },
    }
    labelled = {}
    for detector in DETECTORS:
        for live_tta in LIVE_TTAS:
            log("labelling", len(frames), "frames:", detector, "live-tta", live_tta)
            labelled[detector, live_tta] = label_frames(frames, fps, runner, detector, live_tta)
    result["setups"] = [
        {"detector": detector, "live_tta": live_tta, **stability(track_all(headers, settings))}
        for (detector, live_tta), headers in labelled.items()
    ]
    log("stability", result["setups"])
    tracks = track_all(labelled[DETECTORS[0], LIVE_TTAS[0]], settings)
    result["stability"] = result["setups"][0]
    result["sweep"] = {detector: sweep(labelled[detector, LIVE_TTAS[0]], settings) for detector in DETECTORS}
    ids = {f.track for m in tracks for f in m.results if f.track}
    seconds = len(frames) / fps
    result["one_face"] = {
        "seconds": round(seconds, 1),
        "track_ids": len(ids),
        "id_switches_per_minute": round((len(ids) - 1) * 60 / seconds, 2),
    }
    portrait = cv2.imread(str(media / "justin.jpg"))
    if portrait is None:
        raise common.BenchError(f"{media / 'justin.jpg'}: missing or unreadable")
    composite, regions = composite_clip(frames, portrait)
    log("labelling the composite")
    result["identity"] = identity_metrics(
        track_all(label_frames(composite, fps, runner), settings), regions, len(composite) // 2
    )
    log("identity", result["identity"])
    result["throughput"] = throughput(settings, args.seconds)
    log("throughput", result["throughput"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_json(out / "tracking.json", result)
    write_markdown(out / "tracking.md", result)
    print((out / "tracking.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
