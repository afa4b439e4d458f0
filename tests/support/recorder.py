"""Messages of the tracks channel, as the tracker sends them, for the recorder's tests."""

from __future__ import annotations

import csv
import io
import json
import urllib.parse
import urllib.request

import pytest

from services.common.protocol import (
    EMOTIONS,
    KIND_TRACKS,
    Event,
    TrackedFace,
    TrackEvent,
    Tracks,
    TrackSummary,
    encode,
)

from .processes import http_get

T0 = 1_700_000_000.0


def scores(label: str, p: float = 0.7) -> list[float]:
    rest = (1 - p) / 6
    return [p if e == label else rest for e in EMOTIONS]


def tracks_message(
    stream: str, seq: int, t: float, faces: list[tuple[str | None, str, float]], model: str = "m1"
) -> list:
    """``faces``: (track id or None, smoothed label, age_s) per face."""
    results = [
        TrackedFace(
            box=(10 + 50 * i, 10, 40, 40),
            label=label,
            confidence=0.7,
            scores=scores(label),
            track=track,
            smoothed_label=label,
            smoothed_scores=scores(label, 0.6),
            age_s=age,
        )
        for i, (track, label, age) in enumerate(faces)
    ]
    header = Tracks(
        stream=stream,
        seq=seq,
        width=640,
        height=480,
        timestamps={"capture": t, "track": t + 0.01},
        boxes=[r.box for r in results],
        results=results,
        model=model,
    )
    return encode(header)


def event_message(
    stream: str,
    seq: int,
    name: str,
    track: str,
    t: float,
    label: str = "Happy",
    previous: str = "",
    start: float | None = None,
    frames: int = 10,
) -> list:
    summary = None
    if name == "track_ended":
        shares = [1.0 if e == label else 0.0 for e in EMOTIONS]
        summary = TrackSummary(
            start=start if start is not None else t - 1,
            end=t,
            frames=frames,
            dominant=label,
            mean_scores=scores(label),
            shares=shares,
        )
    header = Event(
        stream=stream,
        seq=seq,
        width=640,
        height=480,
        timestamps={"capture": t, "track": t + 0.01},
        event=TrackEvent(name, track, t, label, previous, summary),
    )
    return encode(header)


def person(
    stream: str, track: str, start: float, seconds: float, fps: float = 30.0, labels=("Happy",), seq0: int = 0
) -> list[list]:
    """A whole track: started event, one tracks message per frame (the label cycling through
    ``labels`` in equal parts), emotion_changed events, the ended event."""
    out = [event_message(stream, seq0, "track_started", track, start, labels[0])]
    frames = int(seconds * fps)
    previous = labels[0]
    for i in range(frames):
        t = start + i / fps
        label = labels[min(len(labels) - 1, i * len(labels) // frames)]
        if label != previous:
            out.append(event_message(stream, seq0 + i, "emotion_changed", track, t, label, previous))
            previous = label
        out.append(tracks_message(stream, seq0 + i, t, [(track, label, round(t - start, 3))]))
    end = start + (frames - 1) / fps
    out.append(
        event_message(stream, seq0 + frames, "track_ended", track, end, previous, start=start, frames=frames)
    )
    return out


# --- the recorder's API, read back after a clip went through a real pipeline ---------


def get_json(port: int, path: str, **query):
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    return json.loads(http_get(url, timeout=10))


def first_sse_event(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        fields = {}
        for raw in response:
            line = raw.decode().rstrip("\n")
            if not line and "data" in fields:
                return fields
            key, _, value = line.partition(": ")
            if key in ("id", "event", "data"):
                fields[key] = value
    raise AssertionError("the event stream ended")


def check_recorded_as_published(api: int, published: list) -> None:
    """What the recorder's API serves for stream ``clip`` is what the tracker published
    (``published``: the headers of the tracks channel, in order; ``--sample-hz 0``)."""
    sent_events = [h.event for h in published if h.kind != KIND_TRACKS]
    listed = get_json(api, "/api/tracks", stream="clip", limit=1000)["tracks"]
    started = [e for e in sent_events if e.name == "track_started"]
    assert sorted(t["track"] for t in listed) == sorted(e.track for e in started)
    assert all(not t["open"] for t in listed)
    for track in listed:
        faces = [
            (h.seq, f)
            for h in published
            if h.kind == KIND_TRACKS
            for f in h.results
            if f.track == track["track"]
        ]
        timeline = get_json(api, f"/api/tracks/{track['id']}")["timeline"]
        assert [o["seq"] for o in timeline] == [seq for seq, _ in faces]  # --sample-hz 0: all
        for observation, (_, face) in zip(timeline, faces):
            assert observation["smoothed_label"] == face.smoothed_label
            assert list(observation["smoothed_scores"].values()) == pytest.approx(
                face.smoothed_scores, abs=1e-4
            )
        ended = next(e for e in sent_events if e.name == "track_ended" and e.track == track["track"])
        assert track["dominant"] == ended.summary.dominant
        assert track["frames"] == ended.summary.frames
    recorded = get_json(api, "/api/events", stream="clip", limit=1000)["events"]
    assert [(e["name"], e["track"], e["time"]) for e in recorded] == [
        (e.name, e.track, e.time) for e in sent_events
    ]
    exported = list(
        csv.DictReader(
            io.StringIO(
                http_get(f"http://127.0.0.1:{api}/api/tracks?stream=clip&format=csv", timeout=10).decode()
            )
        )
    )
    assert [int(r["id"]) for r in exported] == [t["id"] for t in listed]
    summary = get_json(api, "/api/streams/clip/summary", window="1h")
    assert summary["tracks"] == len(listed) and summary["observed_seconds"] > 1
    assert [s["name"] for s in get_json(api, "/api/streams")["streams"]] == ["clip"]
    live = first_sse_event(f"http://127.0.0.1:{api}/api/events/live?stream=clip&after=0")
    assert live["event"] == "track_started" and json.loads(live["data"])["track"] == started[0].track
    png = http_get(f"http://127.0.0.1:{api}/api/tracks/{listed[0]['id']}/timeline.png", timeout=30)
    assert png.startswith(b"\x89PNG")
