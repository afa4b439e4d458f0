"""From the tracker's messages to the notifier's: event notifications (JSON, with an id) and
each camera's state (who is there, with which emotion).

An event notification is the same JSON for MQTT and webhooks (docs/notifier.md#payloads). Its
``id`` is derived from the stream, frame, track and event, so the same event has the same id
after a restart or from a second notifier: receivers drop duplicates by it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field

from services.common.protocol import EMOTIONS, Event, Tracks

from .rules import HELD

# A track not seen for this long (capture time) is taken off its camera's state: its end was
# lost (a tracker restart). Far longer than the tracker's own timeout for a missing face.
STALE_S = 60.0


def event_id(*parts) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:20]


@dataclass
class Notification:
    """One event as the rules see it (the filters) and as the sinks send it (``payload``)."""

    camera: str
    track: str
    name: str
    emotion: str
    confidence: float | None
    duration_s: float
    time: float
    payload: dict

    def body(self, rules: list[str]) -> str:
        return json.dumps({**self.payload, "rules": rules}, separators=(",", ":"))


@dataclass
class TrackView:
    label: str
    since: float  # capture time its label was first shown
    started: float
    last_seen: float  # capture time of its latest frame or event
    held: set = field(default_factory=set)  # rules whose emotion_held fired for this label


class Cameras:
    """Each camera's tracks now, from the events (people, emotions) and the tracks messages
    (confidence, capture time for emotion_held)."""

    def __init__(self):
        self.tracks: dict[str, dict[str, TrackView]] = {}
        self.times: dict[str, float] = {}
        self.seen: dict[tuple[str, str], tuple[str, float]] = {}  # (camera, track) -> label, probability

    def confidence(self, camera: str, track: str, label: str) -> float | None:
        """The smoothed probability of ``label`` in the track's latest tracks message, if
        that message showed this label."""
        seen = self.seen.get((camera, track))
        return seen[1] if seen is not None and seen[0] == label else None

    def state(self, camera: str) -> dict:
        """The retained state message of a camera."""
        tracks = self.tracks.get(camera, {})
        counts = Counter(t.label for t in tracks.values())
        dominant = max(EMOTIONS, key=lambda e: (counts[e], -EMOTIONS.index(e))) if tracks else None
        return {
            "camera": camera,
            "people": len(tracks),
            "dominant": dominant,
            "emotions": {track: t.label for track, t in sorted(tracks.items())},
            "time": self.times.get(camera),
        }

    def on_tracks(self, message: Tracks) -> float | None:
        """Note each track's confidence; returns the frame's capture time (None if unknown)."""
        now = message.timestamps.get("capture")
        views = self.tracks.get(message.stream, {})
        for face in message.results:
            if face.track:
                self.seen[message.stream, face.track] = (face.smoothed_label, face.smoothed_confidence)
                if now is not None and face.track in views:
                    views[face.track].last_seen = now
        if now is not None:
            self.times[message.stream] = now
        return now

    def expire(self, camera: str, now: float) -> list[str]:
        """Forget the camera's tracks not seen for STALE_S; returns their ids."""
        views = self.tracks.get(camera, {})
        stale = [track for track, view in views.items() if now - view.last_seen > STALE_S]
        for track in stale:
            del views[track]
            self.seen.pop((camera, track), None)
        return stale

    def forget(self, camera: str) -> None:
        """Drop everything kept about a camera that has gone quiet."""
        self.tracks.pop(camera, None)
        self.times.pop(camera, None)
        for key in [k for k in self.seen if k[0] == camera]:
            del self.seen[key]

    def on_event(self, message: Event) -> Notification:
        """The notification of an event, after updating the camera's state by it."""
        camera, e = message.stream, message.event
        views = self.tracks.setdefault(camera, {})
        self.times[camera] = e.time
        view = views.get(e.track)
        duration, confidence = 0.0, self.confidence(camera, e.track, e.label)
        payload = {
            "id": event_id(camera, message.seq, e.track, e.name),
            "camera": camera,
            "event": e.name,
            "track": e.track,
            "time": e.time,
            "label": e.label,
            "frame": message.seq,
        }
        if e.name == "track_started" or view is None:
            view = views[e.track] = TrackView(e.label, e.time, e.time, e.time)
        view.last_seen = max(view.last_seen, e.time)
        if e.name == "emotion_changed":
            payload["previous"] = e.previous
            view.label, view.since, view.held = e.label, e.time, set()
        if e.name == "track_ended":
            views.pop(e.track, None)
            self.seen.pop((camera, e.track), None)
            if e.summary is not None:
                payload["summary"] = e.summary.to_wire()
                duration = e.summary.end - e.summary.start
                confidence = e.summary.mean_scores[EMOTIONS.index(e.summary.dominant)]
        payload["confidence"] = confidence
        payload["duration_s"] = round(duration, 3)
        return Notification(camera, e.track, e.name, e.label, confidence, duration, e.time, payload)

    def held(self, camera: str, now: float, rule) -> list[Notification]:
        """emotion_held notifications of ``rule`` due at capture time ``now``: one per track
        and emotion span, once the rule's filters pass."""
        out = []
        for track, view in self.tracks.get(camera, {}).items():
            duration = now - view.since
            confidence = self.confidence(camera, track, view.label)
            if rule.name in view.held or not rule.matches(camera, HELD, view.label, confidence, duration):
                continue
            view.held.add(rule.name)
            payload = {
                "id": event_id(camera, track, HELD, view.since, rule.name),
                "camera": camera,
                "event": HELD,
                "track": track,
                "time": now,
                "label": view.label,
                "since": view.since,
                "confidence": confidence,
                "duration_s": round(duration, 3),
            }
            out.append(Notification(camera, track, HELD, view.label, confidence, duration, now, payload))
        return out
