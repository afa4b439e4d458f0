"""Pictures of tracks: one PNG per track (smoothed probabilities over time, stacked) and an
HTML page that lists them. Matplotlib's object API (``Figure``), not pyplot: it keeps no
global state, so API threads can draw at the same time."""

from __future__ import annotations

import html
import io
from datetime import datetime, timezone
from pathlib import Path

from services.common.palette import hex_colours
from services.common.protocol import EMOTIONS


def clock(t: float | None) -> str:
    if t is None:
        return "—"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def timeline_png(track: dict, points: list[tuple[float, list[float]]]) -> bytes:
    """``points``: (capture time, smoothed scores in EMOTIONS order), oldest first."""
    from matplotlib.figure import Figure  # imported on first use: a second off the start

    figure = Figure(figsize=(8, 2.6), dpi=100)
    axes = figure.subplots()
    if points:
        start = points[0][0]
        times = [t - start for t, _ in points]
        series = [[scores[i] for _, scores in points] for i in range(len(EMOTIONS))]
        axes.stackplot(times, *series, labels=EMOTIONS, colors=hex_colours(), step="post")
        axes.set_xlim(0, max(times[-1], 1e-3))
    axes.set_ylim(0, 1)
    axes.set_xlabel("seconds since the track started")
    axes.set_ylabel("smoothed probability")
    axes.set_title(f"{track['stream']} · track {track['track']} · {clock(track['start'])}", fontsize=10)
    axes.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def index_html(stream: str, since: float, entries: list[tuple[dict, str]]) -> str:
    """``entries``: (track, PNG file name) per track."""
    rows = []
    for track, image in entries:
        shares = track.get("shares") or {}
        top = ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1]) if v >= 0.05)
        end = track["end"] if track["end"] is not None else track["last_seen"]
        rows.append(
            f"<tr><td>{track['id']}</td><td>{html.escape(track['track'])}</td>"
            f"<td>{clock(track['start'])}</td><td>{end - track['start']:.1f} s</td>"
            f"<td>{html.escape(track['dominant'] or track['label'])}</td>"
            f"<td>{html.escape(top)}</td></tr>"
            f'<tr><td colspan=6><img src="{html.escape(image)}" alt="track {track["id"]}"></td></tr>'
        )
    body = "\n".join(rows) or "<tr><td colspan=6>no tracks in this time range</td></tr>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>emotion-stream: {html.escape(stream)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:.2em .6em;text-align:left}}</style>
</head><body>
<h1>Stream {html.escape(stream)}</h1>
<p>{len(entries)} tracks seen since {clock(since)}.</p>
<table><tr><th>id</th><th>track</th><th>start</th><th>duration</th><th>dominant</th><th>shares</th></tr>
{body}
</table></body></html>
"""


def write_report(engine, stream: str, since: float, out: Path) -> int:
    """One PNG per track of ``stream`` seen since ``since`` and an index.html; returns the count."""
    from . import queries

    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for row in queries.walk(engine, lambda after: queries.tracks_query(stream, since, None, after=after)):
        track = queries.track_dict(row)
        points = [
            (o.time, o.smoothed_scores)
            for o in queries.walk(engine, lambda after, pk=track["id"]: queries.observations_query(pk, after))
        ]
        name = f"track-{track['id']}.png"
        (out / name).write_bytes(timeline_png(track, points))
        entries.append((track, name))
    (out / "index.html").write_text(index_html(stream, since, entries), encoding="utf-8")
    return len(entries)
