"""What a job leaves in its output folder: frames.csv, tracks.json, timeline.png and
annotated.mp4 (see docs/analyze.md)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np

from services.common.palette import hex_colours
from services.common.protocol import EMOTIONS, TrackEvent
from services.viewer.draw import draw_results

from .job import FrameRow

# fer's CSV names its score columns by the lower-case emotion and has "frame" and "box".
SCORE_COLUMNS = [e.lower() for e in EMOTIONS]
CSV_COLUMNS = [
    "frame",
    "time_s",
    "face",
    "track",
    "box",
    "x",
    "y",
    "w",
    "h",
    "label",
    "confidence",
    *SCORE_COLUMNS,
    "smoothed_label",
    "missing",
]


def scaled_box(box, scale: float) -> tuple[int, int, int, int]:
    """A box of the sent (downscaled) frame in pixels of the original video."""
    return tuple(int(round(v / scale)) for v in box)


def write_csv(path: Path, rows: list[FrameRow], scale: float) -> int:
    """One row per frame and face; a frame without faces (or without a result) gets one row
    with empty face columns, so every frame of the video is in the file. Returns rows written."""
    written = 0
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(CSV_COLUMNS)
        for row in rows:
            base = [row.index, f"{row.time_s:.3f}"]
            if not row.faces:
                out.writerow(base + [""] * (len(CSV_COLUMNS) - 3) + [row.missing])
                written += 1
                continue
            for i, face in enumerate(row.faces):
                x, y, w, h = scaled_box(face.box, scale)
                out.writerow(
                    base
                    + [
                        i,
                        face.track or "",
                        f"({x}, {y}, {w}, {h})",
                        x,
                        y,
                        w,
                        h,
                        face.label,
                        f"{face.confidence:.4f}",
                        *(f"{s:.4f}" for s in face.scores),
                        face.smoothed_label,
                        "",
                    ]
                )
                written += 1
    return written


def track_summaries(events: list[TrackEvent]) -> list[dict]:
    """tracks.json: one entry per person, from the tracker's track_ended summaries."""
    changes: dict[str, int] = {}
    for event in events:
        if event.name == "emotion_changed":
            changes[event.track] = changes.get(event.track, 0) + 1
    out = []
    for event in events:
        if event.name != "track_ended":
            continue
        s = event.summary
        out.append(
            {
                "track": event.track,
                "start_s": round(s.start, 3),
                "end_s": round(s.end, 3),
                "frames": s.frames,
                "dominant": s.dominant,
                "emotion_changes": changes.get(event.track, 0),
                "mean_scores": dict(zip(EMOTIONS, s.mean_scores)),
                "shares": dict(zip(EMOTIONS, s.shares)),
            }
        )
    return sorted(out, key=lambda t: int(t["track"]) if t["track"].isdigit() else 0)


def write_timeline(path: Path, rows: list[FrameRow], title: str) -> None:
    """Smoothed probabilities over time, stacked, one panel per track."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, tuple[list, list]] = {}
    for row in rows:
        for face in row.faces:
            if face.track:
                times, scores = series.setdefault(face.track, ([], []))
                times.append(row.time_s)
                scores.append(face.smoothed_scores)
    tracks = sorted(series, key=lambda t: int(t) if t.isdigit() else 0)
    fig, axes = plt.subplots(
        max(1, len(tracks)), 1, figsize=(10, 1.8 + 1.6 * max(1, len(tracks))), squeeze=False, sharex=True
    )
    for ax, track in zip(axes[:, 0], tracks):
        times, scores = series[track]
        ax.stackplot(times, np.asarray(scores).T, labels=EMOTIONS, colors=hex_colours())
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"#{track}")
    if not tracks:
        axes[0, 0].text(0.5, 0.5, "no tracked face", ha="center", va="center")
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("seconds into the video")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=7, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_annotated(
    path: Path,
    video: Path,
    rows: list[FrameRow],
    fps: float,
    scale: float,
    model: str,
    privacy: str = "none",
) -> int:
    """The video again with the labels drawn (the viewer's drawing, faces blurred with
    ``privacy="blur"``), same rate and frame count; frames the reader cannot decode again
    are written as black. Returns frames written."""
    source = cv2.VideoCapture(str(video))
    width = int(source.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(source.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise OSError(f"{path}: cannot write an mp4v video")
    written = 0
    try:
        for row in rows:
            ok, frame = source.read()
            if not ok or frame is None or frame.shape[:2] != (height, width):
                frame = np.zeros((height, width, 3), np.uint8)
            faces = [_rescaled(face, scale) for face in row.faces]
            writer.write(draw_results(frame, faces, model, privacy=privacy))
            written += 1
    finally:
        writer.release()
        source.release()
    return written


def _rescaled(face, scale: float):
    from dataclasses import replace

    return replace(face, box=scaled_box(face.box, scale))


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
