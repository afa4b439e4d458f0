"""Tracker: smoothing, reordering, association and events as plain functions; the service's
message handling without sockets; the wire format of tracks and events."""

from __future__ import annotations

import itertools
import subprocess
import sys

import msgpack
import numpy as np
import pytest

from services.common.protocol import (
    EMOTIONS,
    KIND_EVENT,
    KIND_TRACKS,
    Event,
    FaceResult,
    Message,
    Rejected,
    Result,
    TrackedFace,
    TrackEvent,
    Tracks,
    TrackSummary,
    decode,
    encode,
)
from services.tracker.service import TrackerService, owns
from services.tracker.smoothing import SmoothedEmotion, SmoothingSettings
from services.tracker.tracks import ReorderWindow, Tracker, TrackerSettings
from tests.support import ROOT

W, H = 640, 480
T0 = 1_700_000_000.0


def scores_for(label: str, p: float = 0.7) -> list[float]:
    rest = (1 - p) / (len(EMOTIONS) - 1)
    return [p if e == label else rest for e in EMOTIONS]


def result(seq, boxes=(), labels=None, stream="cam", fps=30.0, capture=None):
    labels = labels or ["Happy"] * len(boxes)
    faces = [FaceResult(tuple(b), lab, 0.7, scores_for(lab)) for b, lab in zip(boxes, labels)]
    ts = {"capture": T0 + seq / fps if capture is None else capture}
    return Result(stream, seq, W, H, ts, boxes=[f.box for f in faces], results=faces, model="m1")


def run(tracker: Tracker, headers, step=1 / 30):
    """Feed results one by one, the clock moving ``step`` each; returns every message."""
    out, now = [], 0.0
    for header in headers:
        tracker.add(header, now)
        now += step
        out += tracker.due(now, T0).messages
    return out, now


def events(messages, name=None):
    return [m.event for m in messages if m.kind == KIND_EVENT and name in (None, m.event.name)]


# --- smoothing --------------------------------------------------------------------------------


def test_smoothing_halves_a_frames_weight_after_one_half_life():
    s = SmoothedEmotion(scores_for("Happy", 0.8), 0.0, SmoothingSettings(half_life_s=0.5, hysteresis=0))
    s.update(scores_for("Sad", 0.8), 0.5)
    assert s.scores[EMOTIONS.index("Happy")] == pytest.approx(s.scores[EMOTIONS.index("Sad")])
    # the weighted geometric mean, normalised: sqrt(0.8 * 0.2/6) against sqrt((0.2/6)^2)
    lead = np.sqrt(0.8 * 0.2 / 6) / (0.2 / 6)
    assert s.scores[EMOTIONS.index("Happy")] == pytest.approx(lead / (2 * lead + 5))
    assert s.scores.sum() == pytest.approx(1.0)


def test_a_confident_frame_outweighs_a_hesitant_one():
    """Log-probabilities add up as evidence: one frame sure of Sad beats one leaning Happy."""
    s = SmoothedEmotion(scores_for("Happy", 0.3), 0.0, SmoothingSettings(half_life_s=0.5, hysteresis=0))
    s.update(scores_for("Sad", 0.95), 0.5)
    assert s.label_name == "Sad"


def test_a_zero_probability_does_not_veto_an_emotion_forever():
    s = SmoothedEmotion(scores_for("Happy", 1.0), 0.0, SmoothingSettings(half_life_s=0.2, hysteresis=0.3))
    changed = [s.update(scores_for("Sad", 0.9), i / 30) for i in range(1, 31)]
    assert "Happy" in changed and s.label_name == "Sad"


def test_smoothing_depends_on_time_not_on_frame_count():
    settings = SmoothingSettings(half_life_s=0.4, hysteresis=0.0)
    every, half = (SmoothedEmotion(scores_for("Neutral"), 0.0, settings) for _ in range(2))
    for i in range(1, 31):
        every.update(scores_for("Fear"), i / 30)
        if i % 2 == 0:
            half.update(scores_for("Fear"), i / 30)  # every other frame dropped
    assert np.allclose(every.scores, half.scores, atol=1e-9)


def test_hysteresis_keeps_the_label_until_the_new_one_leads_clearly():
    s = SmoothedEmotion(scores_for("Happy", 0.5), 0.0, SmoothingSettings(0.2, hysteresis=0.3))
    close = [0.0] * 7
    close[EMOTIONS.index("Happy")], close[EMOTIONS.index("Sad")] = 0.45, 0.55
    for i in range(1, 20):
        assert s.update(close, i / 30) is None  # Sad is 1.22 times as likely, less than e^0.3
    assert s.label_name == "Happy"
    changed = [s.update(scores_for("Sad", 0.9), 1 + i / 30) for i in range(30)]
    assert "Happy" in changed and s.label_name == "Sad"


def test_summary_reports_time_shares_dominant_and_mean_scores():
    s = SmoothedEmotion(scores_for("Happy", 1.0), 10.0, SmoothingSettings(0.01, 0.0))
    s.update(scores_for("Happy", 1.0), 13.0)  # 3 s of Happy
    s.update(scores_for("Sad", 1.0), 14.0)  # 1 s of Happy shown, then Sad
    s.update(scores_for("Sad", 1.0), 16.0)  # 2 s of Sad
    summary = s.summary()
    assert summary.frames == 4 and summary.start == 10.0 and summary.end == 16.0
    assert summary.shares[EMOTIONS.index("Happy")] == pytest.approx(4 / 6, abs=1e-3)
    assert summary.shares[EMOTIONS.index("Sad")] == pytest.approx(2 / 6, abs=1e-3)
    assert summary.dominant == "Happy"
    assert summary.mean_scores[EMOTIONS.index("Sad")] == pytest.approx(0.5)


def test_a_one_frame_summary_gives_all_time_to_its_label():
    summary = SmoothedEmotion(scores_for("Fear"), 5.0, SmoothingSettings()).summary()
    assert summary.dominant == "Fear" and summary.shares[EMOTIONS.index("Fear")] == 1.0


def test_bad_smoothing_settings_are_refused():
    for kwargs in ({"half_life_s": 0}, {"hysteresis": 6.0}, {"hysteresis": -0.1}):
        with pytest.raises(ValueError):
            SmoothingSettings(**kwargs)


# --- reordering -------------------------------------------------------------------------------


def test_reorder_window_releases_in_capture_order():
    window = ReorderWindow(0.1)
    for seq in (0, 2, 1, 4, 3):
        assert window.add(result(seq), 0.0) in ("ok", "reordered")
    assert [h.seq for h in window.due(0.1)] == [0, 1, 2, 3, 4]


def test_reorder_window_counts_out_of_order_arrivals_and_refuses_late_ones():
    window = ReorderWindow(0.1)
    assert window.add(result(5), 0.0) == "ok"
    assert window.add(result(3), 0.01) == "reordered"
    assert [h.seq for h in window.due(0.2)] == [3, 5]
    assert window.add(result(4), 0.3) == "late"
    assert window.due(1.0) == []


def test_a_frame_answered_twice_is_taken_once():
    window = ReorderWindow(0.1)
    assert window.add(result(0), 0.0) == "ok"
    assert window.add(result(0), 0.01) == "duplicate"
    assert [h.seq for h in window.due(0.2)] == [0]
    assert window.add(result(0), 0.3) == "duplicate"


def test_the_next_result_in_sequence_does_not_wait():
    window = ReorderWindow(0.1)
    window.add(result(0), 0.0)
    assert [h.seq for h in window.due(0.1)] == [0]
    window.add(result(1), 0.2)
    window.add(result(2), 0.2)
    window.add(result(4), 0.2)
    assert [h.seq for h in window.due(0.2)] == [1, 2]  # 4 waits: 3 may still come
    assert window.next_due(0.2) == pytest.approx(0.1)
    assert [h.seq for h in window.due(0.301)] == [4]


def test_a_clock_step_back_restarts_the_order_instead_of_refusing_the_stream():
    window = ReorderWindow(0.1)
    window.add(result(10), 0.0)
    window.due(1.0)
    stepped = result(11, capture=T0 - 3600)
    assert window.add(stepped, 1.0) == "ok"
    assert [h.seq for h in window.due(2.0)] == [11]


# --- association and events --------------------------------------------------------------------


def moving_faces(n, fps=30.0):
    """Two faces moving in opposite directions; the second leaves after frame 40."""
    for seq in range(n):
        boxes = [(100 + 2 * seq, 100, 80, 80)]
        if seq < 40:
            boxes.append((450 - 2 * seq, 250, 70, 70))
        yield result(seq, boxes, fps=fps)


def test_each_face_keeps_one_id_and_a_new_face_is_confirmed_after_two_frames():
    tracker = Tracker(TrackerSettings(reorder_s=0.0))
    messages, _ = run(tracker, moving_faces(60))
    tracks = [m for m in messages if m.kind == KIND_TRACKS]
    assert [m.seq for m in tracks] == list(range(60))  # one per result, in order
    assert [f.track for f in tracks[0].results] == [None, None]  # not confirmed yet
    for m in tracks[1:]:
        ids = [f.track for f in m.results]
        assert ids == (["1", "2"] if m.seq < 40 else ["1"]), (m.seq, ids)
    started = events(messages, "track_started")
    assert [e.track for e in started] == ["1", "2"]
    assert tracks[-1].results[0].age_s == pytest.approx(58 / 30, abs=1e-3)


def test_a_track_ends_after_the_timeout_and_a_returning_face_gets_a_new_id():
    tracker = Tracker(TrackerSettings(reorder_s=0.0, track_timeout_s=0.5))
    boxes = [(100, 100, 80, 80)]
    frames = [result(s, boxes) for s in range(10)] + [result(s, []) for s in range(10, 40)]
    frames += [result(s, boxes) for s in range(40, 45)]
    messages, _ = run(tracker, frames)
    ended = events(messages, "track_ended")
    assert len(ended) == 1 and ended[0].track == "1"
    assert ended[0].summary.frames == 9 and ended[0].summary.dominant == "Happy"
    assert ended[0].time == pytest.approx(T0 + 9 / 30)
    tracks = [m for m in messages if m.kind == KIND_TRACKS]
    assert tracks[-1].results[0].track == "2"  # never reused
    assert tracks[20].results == []  # frames without faces too


def test_smoothed_label_changes_are_events_and_raw_flicker_is_not():
    tracker = Tracker(TrackerSettings(reorder_s=0.0))
    box = [(100, 100, 80, 80)]
    flicker = ["Happy", "Neutral", "Happy", "Happy"] * 10  # raw label changes 20 times
    frames = [result(s, box, [flicker[s]]) for s in range(40)]
    frames += [result(s, box, ["Sad"]) for s in range(40, 80)]
    messages, _ = run(tracker, frames)
    changes = events(messages, "emotion_changed")
    assert [(e.previous, e.label) for e in changes] == [("Happy", "Sad")]
    state = tracker.streams["cam"]
    assert state.raw_changes >= 20 and state.smoothed_changes == 1


def test_silent_stream_ends_its_tracks_with_the_last_frame_as_context():
    tracker = Tracker(TrackerSettings(reorder_s=0.0, track_timeout_s=0.5))
    _, now = run(tracker, [result(s, [(10, 10, 50, 50)]) for s in range(5)])
    assert tracker.due(now + 0.2, T0).messages == []
    ended = tracker.due(now + 1.0, T0).messages
    assert [(m.kind, m.event.name, m.seq) for m in ended] == [(KIND_EVENT, "track_ended", 4)]


def test_out_of_order_results_give_the_same_ids_as_in_order_ones():
    in_order, _ = run(Tracker(TrackerSettings(reorder_s=0.1)), moving_faces(60))
    frames = list(moving_faces(60))
    shuffled = []
    for i in range(0, 60, 3):  # 3 replicas answer in turn
        shuffled += frames[i : i + 3][::-1]
    tracker = Tracker(TrackerSettings(reorder_s=0.1))
    messages, now = run(tracker, shuffled)
    messages += tracker.due(now + 1, T0).messages

    def ids(msgs):
        return {m.seq: [f.track for f in m.results] for m in msgs if m.kind == KIND_TRACKS}

    assert ids(messages) == ids(in_order)
    assert tracker.counts["reordered"] > 0 and tracker.counts["late"] == 0


def test_streams_are_tracked_apart_and_bounded():
    tracker = Tracker(TrackerSettings(reorder_s=0.0, max_streams=2))
    assert tracker.add(result(0, [(0, 0, 40, 40)], stream="a"), 0) == "ok"
    assert tracker.add(result(0, [(0, 0, 40, 40)], stream="b"), 0) == "ok"
    assert tracker.add(result(0, [(0, 0, 40, 40)], stream="c"), 0) == "streams"
    assert tracker.counts["streams"] == 1


def test_a_track_id_is_never_reused_even_after_its_stream_was_forgotten():
    tracker = Tracker(TrackerSettings(reorder_s=0.0, idle_s=1.0))
    run(tracker, [result(s, [(10, 10, 50, 50)]) for s in range(3)])
    tracker.due(100.0, T0)
    assert "cam" not in tracker.streams
    messages, _ = run(tracker, [result(s, [(10, 10, 50, 50)], capture=T0 + 200 + s) for s in range(3)])
    assert events(messages, "track_started")[0].track == "2"


def test_settings_are_validated():
    for kwargs in ({"reorder_s": -1}, {"track_timeout_s": 0}, {"min_iou": 1.0}, {"confirm_frames": 0}):
        with pytest.raises(ValueError):
            TrackerSettings(**kwargs)


# --- the wire format ---------------------------------------------------------------------------


def tracks_header():
    face = TrackedFace(
        (10, 20, 30, 40), "Fear", 0.6, scores_for("Fear", 0.6), "7", "Happy", scores_for("Happy", 0.5), 2.5
    )
    untracked = TrackedFace(
        (100, 20, 30, 40), "Sad", 0.6, scores_for("Sad", 0.6), None, "Sad", scores_for("Sad", 0.6), 0.0
    )
    return Tracks(
        "cam",
        3,
        W,
        H,
        {"capture": T0},
        boxes=[face.box, untracked.box],
        results=[face, untracked],
        model="m1",
    )


def ended_event():
    summary = TrackSummary(T0, T0 + 3, 90, "Happy", scores_for("Happy"), scores_for("Happy", 1.0))
    return Event(
        "cam",
        4,
        W,
        H,
        {"capture": T0},
        event=TrackEvent("track_ended", "7", T0 + 3, "Happy", summary=summary),
    )


def test_tracks_and_events_survive_the_wire():
    header, _ = decode(encode(tracks_header()), expect_kind=KIND_TRACKS)
    assert header.results == tracks_header().results
    assert header.results[0].smoothed_confidence == pytest.approx(0.5)
    event, _ = decode(encode(ended_event()), expect_kind=KIND_EVENT)
    assert event.event == ended_event().event
    change = Event("cam", 4, W, H, {}, event=TrackEvent("emotion_changed", "7", T0, "Sad", previous="Happy"))
    assert decode(encode(change))[0].event.previous == "Happy"


def mutate(header: Message, change) -> list:
    wire = header.to_wire()
    change(wire)
    return [b"cam", msgpack.packb(wire)]


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda w: w["results"][0].pop("track"), "field"),
        (lambda w: w["results"][0].update(track=5), "field"),
        (lambda w: w["results"][0].update(track="x" * 40), "field"),
        (lambda w: w["results"][0].update(smoothed_label="Joy"), "field"),
        (lambda w: w["results"][0].update(smoothed_scores=[0.1] * 6), "field"),
        (lambda w: w["results"][0].update(smoothed_scores=[float("nan")] * 7), "field"),
        (lambda w: w["results"][0].update(age_s=-1), "field"),
        (lambda w: w["results"][0].update(age_s=True), "field"),
    ],
)
def test_malformed_tracks_are_rejected_with_a_reason(change, reason):
    with pytest.raises(Rejected) as err:
        decode(mutate(tracks_header(), change))
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "change",
    [
        lambda w: w.pop("event"),
        lambda w: w["event"].update(name="track_paused"),
        lambda w: w["event"].update(track=""),
        lambda w: w["event"]["summary"].update(frames=-1),
        lambda w: w["event"]["summary"].update(dominant="Joy"),
        lambda w: w["event"]["summary"].update(shares=[1.0]),
        lambda w: w["event"].pop("summary"),
        lambda w: w["event"].update(time="now"),
    ],
)
def test_malformed_events_are_rejected(change):
    with pytest.raises(Rejected):
        decode(mutate(ended_event(), change))


def test_an_event_with_payload_frames_is_rejected():
    with pytest.raises(Rejected) as err:
        decode(encode(ended_event(), [b"x"]))
    assert err.value.reason == "frames"


# --- the service without sockets -----------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_service_tracks_valid_results_and_counts_bad_ones():
    rejected = []
    clock = Clock()
    service = TrackerService(
        TrackerSettings(reorder_s=0.05), rejected.append, clock=clock, wall_clock=lambda: T0
    )
    service.on_result([b"cam", b"\xc1"])  # not msgpack
    service.on_result(encode(tracks_header()))  # wrong kind for the results channel
    service.on_result([b"cam"])
    assert [r.reason for r in rejected] == ["header", "kind", "frames"]
    for seq in range(3):
        service.on_result(encode(result(seq, [(10, 10, 50, 50)])))
    clock.now = 0.1
    out = [decode(m)[0] for m in service.flush()]
    assert [(m.kind, m.seq) for m in out] == [
        (KIND_TRACKS, 0),
        (KIND_TRACKS, 1),
        (KIND_EVENT, 1),
        (KIND_TRACKS, 2),
    ]
    assert out[1].timestamps["track"] == T0 and out[1].results[0].track == "1"


def test_a_result_without_capture_time_is_tracked_on_arrival_time():
    clock = Clock()
    service = TrackerService(
        TrackerSettings(reorder_s=0.0), [].append, clock=clock, wall_clock=lambda: T0 + clock.now
    )
    header = result(0, [(10, 10, 50, 50)])
    header.timestamps = {}
    service.on_result(encode(header))
    out = [decode(m)[0] for m in service.flush()]
    assert out[0].timestamps["capture"] == T0


def test_shards_split_the_streams_between_replicas():
    streams = [f"cam-{i}" for i in range(200)]
    owners = [[s for s in streams if owns(s, shard, 3)] for shard in range(3)]
    assert sorted(itertools.chain(*owners)) == sorted(streams)  # each exactly once
    assert all(len(o) > 30 for o in owners)
    assert owns("main", 0, 1)


def test_a_replica_ignores_the_streams_of_other_shards():
    clock = Clock()
    service = TrackerService(TrackerSettings(reorder_s=0.0), [].append, shard=0, shards=2, clock=clock)
    mine = next(s for s in (f"s{i}" for i in range(20)) if owns(s, 0, 2))
    theirs = next(s for s in (f"s{i}" for i in range(20)) if not owns(s, 0, 2))
    service.on_result(encode(result(0, [(1, 1, 9, 9)], stream=mine)))
    service.on_result(encode(result(0, [(1, 1, 9, 9)], stream=theirs)))
    assert {decode(m)[0].stream for m in service.flush()} == {mine}


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shards", "2", "--shard", "2"], "--shard 2"),
        (["--reorder-ms", "-5"], "--reorder-ms"),
        (["--half-life-ms", "0"], "--half-life-ms"),
        (["--min-iou", "1.5"], "--min-iou"),
        (["--max-streams", "0"], "--max-streams"),
    ],
)
@pytest.mark.slow
def test_configuration_errors_exit_78_naming_the_option(args, message):
    out = subprocess.run(
        [sys.executable, "-m", "services.tracker", "--metrics-port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 78 and message in out.stderr, out.stderr


# --- streams that go: eviction, and every track ends ----------------------------------------------


def test_streams_that_come_and_go_leave_nothing_behind():
    """100 stream ids, each a face for a few frames and then silence: every track ends with
    its event, every stream is forgotten and counted, and no per-stream state is left."""
    tracker = Tracker(TrackerSettings(reorder_s=0.0, idle_s=5.0))
    started = ended = evicted = 0
    now = 0.0
    for i in range(100):
        for seq in range(4):
            tracker.add(result(seq, [(10, 10, 50, 50)], stream=f"cam-{i}", capture=T0 + now), now)
            now += 1 / 30
            out = tracker.due(now, T0)
            started, ended, evicted = started + out.started, ended + out.ended, evicted + out.evicted
        now += 1.0
    out = tracker.due(now + 10, T0)
    started, ended, evicted = started + out.started, ended + out.ended, evicted + out.evicted
    assert started == ended == 100 and evicted == 100
    assert tracker.streams == {} and tracker.next_due(now) is None


def test_a_stream_forgotten_with_open_tracks_ends_them():
    tracker = Tracker(TrackerSettings(reorder_s=0.0, track_timeout_s=100.0, idle_s=1.0))
    run(tracker, [result(s, [(10, 10, 50, 50)]) for s in range(3)])
    out = tracker.due(10.0, T0)
    (ended,) = events(out.messages, "track_ended")
    assert ended.summary.frames == 2 and out.evicted == 1 and "cam" not in tracker.streams


def test_forget_all_processes_waiting_results_and_ends_every_track():
    tracker = Tracker(TrackerSettings(reorder_s=5.0))
    for stream in ("a", "b"):
        for seq in range(3):
            tracker.add(result(seq, [(10, 10, 50, 50)], stream=stream), 0.0)
    assert tracker.due(0.0, T0).messages == []  # all still waiting for the reorder window
    out = tracker.forget_all(T0)
    assert sum(m.kind == KIND_TRACKS for m in out.messages) == 6
    assert out.started == out.ended == 2 and out.evicted == 2 and tracker.streams == {}
    assert out.messages[-1].kind == KIND_EVENT and out.messages[-1].event.name == "track_ended"


def test_the_service_ends_open_tracks_when_it_stops():
    """Over real inproc:// sockets: the stop event set while a face is in view, the service's
    last messages are that face's track_ended event."""
    import threading

    import zmq

    ctx = zmq.Context.instance()
    results_out, results_in = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    tracks_out, tracks_in = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    results_out.bind("inproc://tracker-stop-results")
    results_in.connect("inproc://tracker-stop-results")
    tracks_out.bind("inproc://tracker-stop-tracks")
    tracks_in.connect("inproc://tracker-stop-tracks")
    service = TrackerService(TrackerSettings(reorder_s=0.0), [].append)
    stop = threading.Event()
    loop = threading.Thread(target=service.run, args=(results_in, tracks_out, stop))
    loop.start()
    try:
        for seq in range(5):
            results_out.send_multipart(encode(result(seq, [(10, 10, 50, 50)], capture=T0 + seq / 30)))
        received = []
        while not events(received, "track_started"):
            assert tracks_in.poll(5000), "no tracks in time"
            received.append(decode(tracks_in.recv_multipart())[0])
        stop.set()
        loop.join(5)
        assert not loop.is_alive()
        while tracks_in.poll(0):
            received.append(decode(tracks_in.recv_multipart())[0])
        (ended,) = events(received, "track_ended")
        assert ended.track == "1" and ended.summary.frames >= 2 and service.tracker.streams == {}
    finally:
        stop.set()
        for sock in (results_out, results_in, tracks_out, tracks_in):
            sock.close(linger=0)
