"""Messages of the tracks channel, as the tracker sends them, for the recorder's tests."""

from __future__ import annotations

from services.common.protocol import EMOTIONS, Event, TrackedFace, TrackEvent, Tracks, TrackSummary, encode

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
