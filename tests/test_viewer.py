"""Viewer: joiner rules, drawing, the web server, and the real process over real ZeroMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

import cv2
import msgpack
import numpy as np
import pytest
import zmq

from services.common.protocol import (
    EMOTIONS,
    ENCODING_BGR,
    Event,
    FaceResult,
    Frame,
    Rejected,
    Result,
    TrackedFace,
    TrackEvent,
    Tracks,
    encode,
)
from services.viewer.draw import draw_results, track_colour
from services.viewer.hub import WATCH_LINGER_S, RateMeter, StreamClosed, StreamHub
from services.viewer.join import FrameJoiner
from services.viewer.service import ViewerService, ViewerSettings
from services.viewer.web import render_page, start_web_server, stop_web_server
from tests.support import free_port, metric_samples, metric_sum, wait_for
from tests.support.viewer import bind_broker_side, start_viewer_process

ROOT = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 320, 240
BOX = (100, 60, 120, 120)


# --- helpers -------------------------------------------------------------------------------


def face(label="Happy", confidence=0.87, box=BOX) -> FaceResult:
    scores = [0.0] * len(EMOTIONS)
    scores[EMOTIONS.index(label)] = confidence
    return FaceResult(box=box, label=label, confidence=confidence, scores=scores)


def frame_header(seq, stream="cam", capture=None, encoding="jpeg", width=WIDTH, height=HEIGHT):
    ts = {} if capture is None else {"capture": capture}
    return Frame(stream=stream, seq=seq, width=width, height=height, timestamps=ts, encoding=encoding)


def result_header(seq, faces=(), stream="cam", capture=None, model="test-v1"):
    ts = {} if capture is None else {"capture": capture}
    faces = list(faces)
    return Result(
        stream=stream,
        seq=seq,
        width=WIDTH,
        height=HEIGHT,
        timestamps=ts,
        boxes=[f.box for f in faces],
        results=faces,
        model=model,
    )


def source_image() -> np.ndarray:
    """A grey scene with a darker 'face' square, so any overlay stands out."""
    image = np.full((HEIGHT, WIDTH, 3), 100, np.uint8)
    x, y, w, h = BOX
    image[y + 10 : y + h - 10, x + 10 : x + w - 10] = 60
    return image


def jpeg_of(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def box_border_difference(annotated: np.ndarray, source: np.ndarray) -> float:
    """Mean absolute difference along the box's top and left edges."""
    x, y, w, h = BOX
    edges = [(slice(y, y + 2), slice(x, x + w)), (slice(y, y + h), slice(x, x + 2))]
    return float(np.mean([np.abs(annotated[e].astype(int) - source[e].astype(int)).mean() for e in edges]))


def labels(shown) -> list[str]:
    return [r.label for r in shown.results]


# --- FrameJoiner: live mode (delay 0) ------------------------------------------------------


def test_live_shows_newest_frame_at_once_with_latest_labels():
    joiner = FrameJoiner(delay_s=0)
    joiner.add_frame(frame_header(0), b"f0", now=0.0)
    [shown] = joiner.ready(now=0.0)
    assert shown.header.seq == 0 and shown.payload == b"f0"
    assert shown.results == [] and not shown.own and not shown.late

    joiner.add_result(result_header(0, [face("Sad")]), now=0.01)
    joiner.add_frame(frame_header(1), b"f1", now=0.03)
    joiner.add_frame(frame_header(2), b"f2", now=0.06)
    [shown] = joiner.ready(now=0.06)
    assert shown.header.seq == 2 and labels(shown) == ["Sad"] and shown.model == "test-v1"
    assert joiner.dropped["superseded"] == 1
    assert joiner.ready(now=0.07) == []


def test_live_reuses_labels_until_new_results_and_zero_faces_clear_them():
    joiner = FrameJoiner(delay_s=0)
    joiner.add_result(result_header(0, [face("Angry"), face("Fear", box=(0, 0, 10, 10))]), 0.0)
    for seq in (1, 2):
        joiner.add_frame(frame_header(seq), b"", now=seq)
        [shown] = joiner.ready(now=seq)
        assert labels(shown) == ["Angry", "Fear"]
    joiner.add_result(result_header(2, []), now=2.5)
    joiner.add_frame(frame_header(3), b"", now=3)
    [shown] = joiner.ready(now=3)
    assert shown.results == []
    assert joiner.latest("cam").results == []


def test_live_marks_labels_as_own_when_they_belong_to_the_frame():
    joiner = FrameJoiner(delay_s=0)
    joiner.add_frame(frame_header(5, capture=100.0), b"", now=0)
    joiner.add_result(result_header(5, [face()], capture=100.0), now=0)
    [shown] = joiner.ready(now=0)
    assert shown.own


def test_an_older_result_does_not_replace_newer_labels():
    joiner = FrameJoiner(delay_s=0)
    joiner.add_result(result_header(8, [face("Happy")], capture=108.0), now=0)
    joiner.add_result(result_header(7, [face("Sad")], capture=107.0), now=0)
    assert [r.label for r in joiner.latest("cam").results] == ["Happy"]


def test_a_capture_restart_is_accepted_despite_smaller_sequence_numbers():
    joiner = FrameJoiner(delay_s=0)
    joiner.add_frame(frame_header(500, capture=100.0), b"", now=0)
    joiner.ready(now=0)
    joiner.add_result(result_header(500, [face("Sad")], capture=100.0), now=0)
    assert joiner.add_frame(frame_header(0, capture=200.0), b"", now=1)
    joiner.add_result(result_header(0, [face("Happy")], capture=200.0), now=1)
    [shown] = joiner.ready(now=1)
    assert shown.header.seq == 0 and labels(shown) == ["Happy"]


def test_without_capture_times_seq_orders_and_a_big_step_back_is_a_restart():
    joiner = FrameJoiner(delay_s=0, capacity=8)
    joiner.add_result(result_header(20, [face("Happy")]), now=0)
    joiner.add_result(result_header(19, [face("Sad")]), now=0)
    assert joiner.latest("cam").seq == 20
    joiner.add_frame(frame_header(20), b"", now=0)
    joiner.ready(now=0)
    assert not joiner.add_frame(frame_header(15), b"", now=0)
    assert joiner.add_frame(frame_header(0), b"", now=1)  # 20 back: capture restarted
    joiner.add_result(result_header(0, []), now=1)
    assert joiner.latest("cam").seq == 0


def test_a_frame_captured_before_the_last_shown_one_is_dropped():
    joiner = FrameJoiner(delay_s=0)
    joiner.add_frame(frame_header(10, capture=110.0), b"", now=0)
    joiner.ready(now=0)
    assert not joiner.add_frame(frame_header(9, capture=109.0), b"", now=0)
    assert joiner.dropped["out_of_order"] == 1 and joiner.ready(now=0) == []


def test_frames_that_never_arrived_are_counted_as_missed():
    """Capture numbers frames consecutively, so a jump in seq is frames lost on the way;
    a step back is a restarted capture, not a loss."""
    joiner = FrameJoiner(delay_s=0)
    for seq in (3, 4, 7, 8, 20, 0, 1, 1, 3):
        joiner.add_frame(frame_header(seq), b"", now=0)
    assert joiner.dropped["missed"] == 2 + 11 + 1


# --- FrameJoiner: exact sync (delay > 0) ---------------------------------------------------


def test_sync_holds_a_frame_until_its_own_result_arrives():
    joiner = FrameJoiner(delay_s=0.5)
    joiner.add_result(result_header(0, [face("Neutral")]), now=0)
    joiner.add_frame(frame_header(1), b"f1", now=0.1)
    assert joiner.ready(now=0.2) == []
    joiner.add_result(result_header(1, [face("Surprise")]), now=0.3)
    [shown] = joiner.ready(now=0.3)
    assert shown.header.seq == 1 and labels(shown) == ["Surprise"]
    assert shown.own and not shown.late


def test_sync_shows_a_timed_out_frame_late_with_the_latest_labels():
    joiner = FrameJoiner(delay_s=0.5)
    joiner.add_result(result_header(0, [face("Happy")]), now=0)
    joiner.add_frame(frame_header(1), b"f1", now=0.1)
    joiner.add_frame(frame_header(2), b"f2", now=0.2)
    assert joiner.ready(now=0.59) == []
    assert joiner.next_due(now=0.59) == pytest.approx(0.01)
    [shown] = joiner.ready(now=0.6)
    assert shown.header.seq == 1 and shown.late and not shown.own
    assert labels(shown) == ["Happy"] and joiner.late == 1
    assert joiner.pending("cam") == [2]
    assert joiner.next_due(now=0.6) == pytest.approx(0.1)


def test_sync_skips_older_waiting_frames_once_a_newer_one_has_its_result():
    joiner = FrameJoiner(delay_s=0.5)
    for seq in (1, 2, 3, 4):
        joiner.add_frame(frame_header(seq), b"", now=seq * 0.03)
    joiner.add_result(result_header(3, [face("Fear")]), now=0.2)  # 1 and 2 lost upstream
    [shown] = joiner.ready(now=0.2)
    assert shown.header.seq == 3 and shown.own and labels(shown) == ["Fear"]
    assert joiner.dropped["superseded"] == 2 and joiner.late == 0
    assert joiner.pending("cam") == [4]
    joiner.add_result(result_header(2, [face("Sad")]), now=0.25)  # too late to matter
    assert joiner.ready(now=0.25) == []
    assert joiner.latest("cam").results[0].label == "Fear"


def test_sync_shows_the_newest_of_several_due_frames_only():
    joiner = FrameJoiner(delay_s=0.5)
    for seq in (1, 2, 3):
        joiner.add_frame(frame_header(seq), b"", now=0)
        joiner.add_result(result_header(seq, [face()]), now=0)
    [shown] = joiner.ready(now=0)
    assert shown.header.seq == 3 and joiner.dropped["superseded"] == 2


def test_sync_frame_with_zero_faces_is_shown_without_labels():
    joiner = FrameJoiner(delay_s=1.0)
    joiner.add_result(result_header(0, [face()]), now=0)
    joiner.add_frame(frame_header(1), b"", now=0)
    joiner.add_result(result_header(1, []), now=0.1)
    [shown] = joiner.ready(now=0.1)
    assert shown.own and shown.results == []


def test_sync_ignores_a_result_whose_capture_time_belongs_to_another_frame():
    joiner = FrameJoiner(delay_s=1.0)
    joiner.add_frame(frame_header(3, capture=50.0), b"", now=0)
    joiner.add_result(result_header(3, [face()], capture=40.0), now=0.1)
    assert joiner.ready(now=0.2) == []


# --- FrameJoiner: bounds and streams -------------------------------------------------------


def test_buffer_is_bounded_and_evicted_frames_are_counted():
    drops = []
    joiner = FrameJoiner(delay_s=10.0, capacity=4, on_drop=lambda r, n: drops.append((r, n)))
    for seq in range(10):
        joiner.add_frame(frame_header(seq), b"", now=seq * 0.01)
        assert len(joiner.pending("cam")) <= 4
    assert joiner.pending("cam") == [6, 7, 8, 9]
    assert joiner.dropped["evicted"] == 6 and drops.count(("evicted", 1)) == 6
    joiner.add_result(result_header(2, [face("Disgust")]), now=0.2)  # frame 2 is long gone
    assert [r.label for r in joiner.latest("cam").results] == ["Disgust"]


def test_streams_are_joined_independently():
    joiner = FrameJoiner(delay_s=1.0)
    joiner.add_frame(frame_header(1, stream="a"), b"a1", now=0)
    joiner.add_frame(frame_header(1, stream="b"), b"b1", now=0)
    joiner.add_result(result_header(1, [face("Angry")], stream="b"), now=0.1)
    [shown] = joiner.ready(now=0.1)
    assert shown.header.stream == "b" and labels(shown) == ["Angry"]
    joiner.add_result(result_header(1, [face("Fear")], stream="a"), now=0.2)
    [shown] = joiner.ready(now=0.2)
    assert shown.header.stream == "a" and labels(shown) == ["Fear"]
    assert joiner.latest("b").results[0].label == "Angry"


def test_stream_count_is_bounded_and_idle_streams_make_room():
    joiner = FrameJoiner(delay_s=0, max_streams=2, idle_s=5.0)
    assert joiner.add_frame(frame_header(0, stream="a"), b"", now=0)
    assert joiner.add_frame(frame_header(0, stream="b"), b"", now=3)
    assert not joiner.add_frame(frame_header(0, stream="c"), b"", now=4)
    assert joiner.dropped["streams"] == 1
    assert joiner.add_frame(frame_header(0, stream="c"), b"", now=6)  # "a" idle for 6 s
    assert sorted(joiner.streams) == ["b", "c"]


def test_invalid_joiner_settings_are_refused():
    with pytest.raises(ValueError):
        FrameJoiner(delay_s=-1)
    with pytest.raises(ValueError):
        FrameJoiner(capacity=0)


# --- drawing -------------------------------------------------------------------------------


def test_draw_results_changes_the_box_area_and_leaves_the_input_alone():
    source = source_image()
    before = source.copy()
    annotated = draw_results(source, [face("Happy", 0.87)], "test-v1", stream="cam", fps=29.7)
    assert np.array_equal(source, before)
    assert annotated.shape == source.shape and annotated.dtype == np.uint8
    assert box_border_difference(annotated, source) > 40
    x, y, w, _ = BOX
    tag = np.abs(annotated[y - 12 : y, x : x + 40].astype(int) - source[y - 12 : y, x : x + 40]).mean()
    assert tag > 40  # the filled label background
    footer = annotated[-8:].astype(int).mean()
    assert footer < source[-8:].mean()  # darkened footer bar


def test_draw_results_copes_with_edges_odd_text_and_grey_input():
    grey = np.full((60, 80), 128, np.uint8)
    annotated = draw_results(grey, [face("Fear", 1.7, box=(0, 0, 80, 60))], "", stream="caméra ☺", fps=None)
    assert annotated.shape == (60, 80, 3)
    no_faces = draw_results(source_image(), [], "v2")
    assert box_border_difference(no_faces, source_image()) == 0


# --- Viewer (no sockets) -------------------------------------------------------------------


class Rejects(list):
    def __call__(self, error: Rejected) -> None:
        self.append(error.reason)


def make_viewer(**settings) -> tuple[ViewerService, StreamHub, Rejects]:
    hub, rejects = StreamHub(), Rejects()
    return ViewerService(ViewerSettings(**settings), hub, rejects), hub, rejects


def test_viewer_composites_frames_with_labels_into_the_hub():
    viewer, hub, rejects = make_viewer()
    source = source_image()
    viewer.on_result(encode(result_header(0, [face("Happy")])))
    viewer.on_frame(encode(frame_header(1, capture=time.time()), [jpeg_of(source)]))
    assert viewer.flush() == 1
    jpeg = hub.snapshot("cam")
    annotated = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert box_border_difference(annotated, source) > 30
    status = hub.status()["streams"]["cam"]
    assert status["frames_shown"] == 1 and status["last_seq"] == 1
    assert status["labels"][0]["label"] == "Happy" and status["model"] == "test-v1"
    assert status["e2e_latency_p50_ms"] is not None
    assert rejects == []


def test_viewer_service_runs_its_loop_over_real_inproc_sockets_until_stopped():
    """The loop as __main__ runs it, fed through ZeroMQ (inproc), not by direct calls."""
    ctx = zmq.Context()
    viewer, hub, rejects = make_viewer()
    outs, ins = [], []
    for channel in ("frames", "results", "tracks"):
        pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
        pub.bind(f"inproc://viewer-{channel}")
        sub.connect(f"inproc://viewer-{channel}")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        outs.append(pub)
        ins.append(sub)
    frames_out, results_out, _ = outs
    stop = threading.Event()
    loop = threading.Thread(target=viewer.run, args=(ins[0], ins[1], stop, ins[2]), daemon=True)
    loop.start()
    try:

        def sent_and_shown() -> bool:
            results_out.send_multipart(encode(result_header(0, [face("Happy")])))
            frames_out.send_multipart(encode(frame_header(1, capture=time.time()), [jpeg_of(source_image())]))
            frames_out.send_multipart([b"cam", b"\xc1 not msgpack"])
            return hub.snapshot("cam") is not None and "header" in rejects

        wait_for(sent_and_shown, 5, interval=0.05, what="a frame shown through the sockets")
        assert hub.status()["streams"]["cam"]["labels"][0]["label"] == "Happy"
        stop.set()
        loop.join(2)
        assert not loop.is_alive(), "the loop did not end on stop"
    finally:
        stop.set()
        for sock in outs + ins:
            sock.close(0)
        ctx.term()


def tracks_header(seq, track="3", smoothed="Happy", stream="cam"):
    raw = face("Fear", 0.5)
    smoothed_scores = [0.02] * len(EMOTIONS)
    smoothed_scores[EMOTIONS.index(smoothed)] = 0.82
    tracked = TrackedFace(
        raw.box, raw.label, raw.confidence, raw.scores, track, smoothed, smoothed_scores, 4.0
    )
    return Tracks(
        stream=stream,
        seq=seq,
        width=WIDTH,
        height=HEIGHT,
        timestamps={},
        boxes=[tracked.box],
        results=[tracked],
        model="test-v1",
    )


def test_viewer_draws_tracks_with_ids_and_smoothed_labels_instead_of_raw_results():
    viewer, hub, rejects = make_viewer()
    source = source_image()
    viewer.on_tracks(encode(tracks_header(0)))
    viewer.on_result(encode(result_header(0, [face("Sad")])))  # the raw view: not drawn
    viewer.on_tracks(
        encode(
            Event(
                stream="cam",
                seq=0,
                width=WIDTH,
                height=HEIGHT,
                event=TrackEvent("track_started", "3", 0.0, "Happy"),
            )
        )
    )
    viewer.on_frame(encode(frame_header(1, capture=time.time()), [jpeg_of(source)]))
    assert viewer.flush() == 1
    status = hub.status()["streams"]["cam"]
    assert status["tracks"] == [
        {"track": "3", "label": "Happy", "confidence": 0.82, "box": list(BOX), "age_s": 4.0}
    ]
    assert status["labels"][0]["label"] == "Fear"
    annotated = cv2.imdecode(np.frombuffer(hub.snapshot("cam"), np.uint8), cv2.IMREAD_COLOR)
    assert box_border_difference(annotated, source) > 30
    viewer.on_tracks(encode(result_header(2, [face("Sad")])))  # a result on the tracks channel
    assert rejects == ["kind"]


def test_the_viewer_receives_raw_results_only_while_a_stream_goes_without_tracks():
    """While the tracker's view of every stream arrives, the loop unsubscribes from raw
    results (the publisher, here an XPUB as in the broker, sees the unsubscription and
    sends none); when a stream's tracks stop for TRACKED_FOR_S it subscribes again."""
    ctx = zmq.Context()
    now = [100.0]
    hub, rejects = StreamHub(), Rejects()
    viewer = ViewerService(ViewerSettings(), hub, rejects, clock=lambda: now[0])
    frames_out, results_out, tracks_out = ctx.socket(zmq.PUB), ctx.socket(zmq.XPUB), ctx.socket(zmq.PUB)
    ins = []
    for channel, pub in (("frames", frames_out), ("results", results_out), ("tracks", tracks_out)):
        pub.bind(f"inproc://subscribe-{channel}")
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"inproc://subscribe-{channel}")
        ins.append(sub)
    stop = threading.Event()
    loop = threading.Thread(target=viewer.run, args=(*ins[:2], stop, ins[2]), daemon=True)
    loop.start()
    seq = iter(range(10_000))
    try:
        assert results_out.poll(5000) and results_out.recv() == b"\x01"  # subscribed at start

        def one_frame(tracked: bool) -> None:
            n = next(seq)
            frames_out.send_multipart(encode(frame_header(n, capture=time.time()), [jpeg_of(source_image())]))
            if tracked:
                tracks_out.send_multipart(encode(tracks_header(n)))

        def unsubscribed() -> bool:
            one_frame(tracked=True)
            return results_out.poll(20) and results_out.recv() == b"\x00"

        wait_for(unsubscribed, 5, interval=0.01, what="the unsubscription from raw results")
        now[0] += 1.0
        one_frame(tracked=False)
        assert not results_out.poll(200)  # tracks 1 s old: still not needed
        now[0] += 1.5

        def subscribed() -> bool:
            one_frame(tracked=False)
            return results_out.poll(20) and results_out.recv() == b"\x01"

        wait_for(subscribed, 5, interval=0.01, what="the subscription to raw results again")
        assert rejects == []
    finally:
        stop.set()
        loop.join(2)
        for sock in (frames_out, results_out, tracks_out, *ins):
            sock.close(0)
        ctx.term()


def test_the_viewer_receives_frames_only_while_someone_looks():
    """Nobody looking: the loop unsubscribes from frames (the XPUB, as the broker, sees it).
    A page or picture asked for: frames are subscribed for WATCH_LINGER_S, and for as long
    as a client stays connected. Frames that did not come meanwhile are not 'missed'."""
    ctx = zmq.Context()
    now = [100.0]
    hub = StreamHub(clock=lambda: now[0])
    viewer = ViewerService(ViewerSettings(), hub, Rejects(), clock=lambda: now[0])
    frames_out, results_out = ctx.socket(zmq.XPUB), ctx.socket(zmq.PUB)
    frames_out.bind("inproc://watched-frames")
    results_out.bind("inproc://watched-results")
    ins = []
    for channel in ("frames", "results"):
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"inproc://watched-{channel}")
        ins.append(sub)
    stop = threading.Event()
    loop = threading.Thread(target=viewer.run, args=(*ins, stop), daemon=True)
    loop.start()

    def subscription() -> bytes:
        assert frames_out.poll(5000), "no (un)subscription"
        return frames_out.recv()

    try:
        assert subscription() == b"\x01"  # as the socket comes
        assert subscription() == b"\x00"  # nobody looks
        missed = viewer.joiner.dropped["missed"]
        hub.look()
        assert subscription() == b"\x01"
        frames_out.send_multipart(encode(frame_header(1, capture=time.time()), [jpeg_of(source_image())]))
        wait_for(lambda: hub.status()["streams"].get("cam", {}).get("frames_shown") == 1, 5, 0.01)
        with hub.client_slot():
            now[0] += WATCH_LINGER_S + 1
            assert not frames_out.poll(200)  # a client is connected: still wanted
        now[0] += WATCH_LINGER_S - 1
        assert not frames_out.poll(200)  # it left a moment ago: still wanted
        now[0] += 2
        assert subscription() == b"\x00"
        hub.look()
        assert subscription() == b"\x01"
        frames_out.send_multipart(encode(frame_header(500, capture=time.time()), [jpeg_of(source_image())]))
        wait_for(lambda: hub.status()["streams"]["cam"]["frames_shown"] == 2, 5, 0.01)
        assert viewer.joiner.dropped["missed"] == missed  # 498 frames not sent, not lost
    finally:
        stop.set()
        loop.join(2)
        for sock in (frames_out, results_out, *ins):
            sock.close(0)
        ctx.term()


def test_a_client_after_a_pause_waits_for_a_fresh_picture():
    now = [100.0]
    hub = StreamHub(clock=lambda: now[0])
    hub.publish("cam", b"old", seq=1, results=[], model="m")
    assert hub.fresh_number("cam") == 0  # recent: the current picture is shown at once
    now[0] += 60
    assert hub.fresh_number("cam") == 1  # stale: wait for the next
    assert hub.wait_frame("cam", hub.fresh_number("cam"), 0.05) is None
    hub.know("other", [face("Sad")], "m2")
    other = hub.status()["streams"]["other"]
    assert hub.streams() == ["cam", "other"] and other["frames_shown"] == 0
    assert [x["label"] for x in other["labels"]] == ["Sad"] and other["model"] == "m2"
    assert hub.snapshot("cam") == b"old"  # none came within FIRST_PICTURE_S: the old one


def test_tracked_faces_are_drawn_with_their_id_and_colour():
    image = source_image()
    tracked = tracks_header(0).results[0]
    drawn = draw_results(image, [tracked], "m")
    untracked = draw_results(image, [face("Happy", 0.82)], "m")
    assert track_colour("3") != track_colour("4") and track_colour("3") == track_colour("3")
    assert np.abs(drawn.astype(int) - untracked.astype(int)).sum() > 0  # "#3 " and colour


def test_viewer_accepts_raw_bgr_frames():
    viewer, hub, _ = make_viewer()
    raw = source_image()
    viewer.on_frame(encode(frame_header(0, encoding=ENCODING_BGR), [raw.tobytes()]))
    assert viewer.flush() == 1 and hub.snapshot("cam")


def test_viewer_rejects_bad_input_without_raising():
    viewer, hub, rejects = make_viewer()
    viewer.on_frame([b"cam", os.urandom(40)])
    viewer.on_frame([b"cam"])
    viewer.on_frame([b"cam", msgpack.packb({"v": 99, "kind": "frame"})])
    viewer.on_result(encode(frame_header(0), [b"x"]))  # wrong kind
    viewer.on_frame(encode(frame_header(0), [b"not a jpeg"]))  # refused at display
    assert viewer.flush() == 0
    viewer.on_frame(encode(frame_header(1, width=64, height=64), [jpeg_of(source_image())]))
    assert viewer.flush() == 0
    assert rejects == ["header", "frames", "version", "kind", "image", "size"]
    assert hub.streams() == []


def test_hub_renders_a_picture_only_when_asked_and_once():
    hub, calls = StreamHub(), []

    def picture(n):
        return lambda: calls.append(n) or f"jpeg {n}".encode()

    for n in range(1, 6):
        hub.publish("cam", picture(n), seq=n, results=[], model="m")
    assert calls == [] and hub.status()["streams"]["cam"]["frames_shown"] == 5
    assert hub.snapshot("cam") == b"jpeg 5" and hub.snapshot("cam") == b"jpeg 5"
    assert hub.wait_frame("cam", 0, 0.01) == (5, b"jpeg 5", 5)
    assert calls == [5]
    hub.publish("cam", lambda: None, seq=6, results=[], model="m")  # a picture that fails
    assert hub.wait_frame("cam", 5, 0.01) == (6, b"jpeg 5", 6)  # the last good picture


def test_unwatched_frames_are_not_decoded_until_someone_looks():
    viewer, hub, rejects = make_viewer()
    good = jpeg_of(source_image())
    broken = good[:200] + bytes(len(good) - 200)  # a real JPEG header, then zeros
    viewer.on_frame(encode(frame_header(0, capture=time.time()), [broken]))
    assert viewer.flush() == 1 and rejects == []  # checked, published, not decoded
    assert hub.snapshot("cam") is None and rejects == ["image"]
    viewer.on_frame(encode(frame_header(1, capture=time.time()), [good]))
    assert viewer.flush() == 1
    picture = cv2.imdecode(np.frombuffer(hub.snapshot("cam"), np.uint8), cv2.IMREAD_COLOR)
    assert picture.shape == source_image().shape


def test_viewer_drops_stale_frames_and_decodes_only_shown_ones():
    viewer, hub, _ = make_viewer(max_age_s=0.5)
    viewer.on_frame(encode(frame_header(0, capture=time.time() - 5), [jpeg_of(source_image())]))
    assert viewer.flush() == 0
    for seq in range(1, 6):
        viewer.on_frame(encode(frame_header(seq, capture=time.time()), [b"garbage, never decoded"]))
    viewer.on_frame(encode(frame_header(6, capture=time.time()), [jpeg_of(source_image())]))
    assert viewer.flush() == 1
    assert hub.status()["streams"]["cam"]["last_seq"] == 6


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_viewer_with_delay_waits_for_results_and_counts_late_frames():
    clock = FakeClock()
    hub, rejects = StreamHub(clock=clock), Rejects()
    viewer = ViewerService(ViewerSettings(delay_s=0.2), hub, rejects, clock=clock)
    jpeg = jpeg_of(source_image())
    viewer.on_frame(encode(frame_header(0), [jpeg]))
    viewer.on_frame(encode(frame_header(1), [jpeg]))
    assert viewer.flush() == 0 and 1 <= viewer.poll_timeout_ms() <= 201
    viewer.on_result(encode(result_header(0, [face("Sad")])))
    assert viewer.flush() == 1
    clock.now += 0.25
    assert viewer.flush() == 1  # frame 1 never got its result
    status = hub.status()["streams"]["cam"]
    assert status["last_seq"] == 1 and status["late_frames"] == 1
    assert status["labels"][0]["label"] == "Sad"


def test_viewer_forgets_idle_streams():
    clock = FakeClock()
    hub, rejects = StreamHub(clock=clock), Rejects()
    viewer = ViewerService(ViewerSettings(idle_s=5.0), hub, rejects, clock=clock)
    viewer.on_frame(encode(frame_header(0), [jpeg_of(source_image())]))
    assert viewer.flush() == 1 and hub.streams() == ["cam"]
    clock.now += 10
    viewer.flush()
    assert hub.streams() == [] and viewer.joiner.streams == []


def test_options_are_validated(monkeypatch):
    from services.viewer.options import parse_args

    for name in [n for n in os.environ if n.startswith("EMOTION_")]:
        monkeypatch.delenv(name)
    args = parse_args([])
    assert (
        args.http_host,
        args.http_port,
        args.delay_ms,
        args.buffer_frames,
        args.jpeg_quality,
        args.max_age_ms,
        args.window,
        args.metrics_port,
    ) == ("127.0.0.1", 8080, 0, 64, 80, 1000, False, 9104)
    for bad in (["--jpeg-quality", "0"], ["--delay-ms", "-1"], ["--buffer-frames", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


# --- hub and web server (in process) -------------------------------------------------------


def test_rate_meter_measures_recent_events_only():
    meter = RateMeter(window_s=2.0)
    for i in range(11):
        meter.tick(i * 0.1)
    assert meter.rate(1.0) == pytest.approx(10.0)
    assert meter.rate(10.0) == 0.0


def test_hub_wait_frame_wakes_on_publish_and_ends_on_removal():
    hub = StreamHub()
    with pytest.raises(StreamClosed):
        hub.wait_frame("cam", 0, 0.01)
    hub.publish("cam", b"one", seq=1, results=[], model="m")
    assert hub.wait_frame("cam", 0, 0.01)[:2] == (1, b"one")
    assert hub.wait_frame("cam", 1, 0.01) is None
    threading.Timer(0.05, hub.publish, ("cam", b"two"), {"seq": 2, "results": [], "model": "m"}).start()
    assert hub.wait_frame("cam", 1, 2.0)[:2] == (2, b"two")
    threading.Timer(0.05, hub.remove, ("cam",)).start()
    with pytest.raises(StreamClosed):
        hub.wait_frame("cam", 2, 2.0)


def test_page_escapes_and_quotes_stream_ids():
    page = render_page(['<script>"x"</script>', "a b/c"])
    assert "<script>" not in page
    assert 'src="/stream/%3Cscript%3E%22x%22%3C%2Fscript%3E.mjpg"' in page
    assert 'src="/stream/a%20b%2Fc.mjpg"' in page


@pytest.fixture
def web():
    hub = StreamHub()
    server, _ = start_web_server("127.0.0.1", 0, hub)
    yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    stop_web_server(server, hub)


def get(url: str, timeout: float = 3.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_web_serves_only_its_paths_with_correct_headers(web):
    hub, base = web
    jpeg = jpeg_of(source_image())
    hub.publish("a b/c", jpeg, seq=3, results=[face()], model="m1", latency_s=0.04)
    status, headers, body = get(base + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "Access-Control-Allow-Origin" not in headers
    assert b'src="/stream/a%20b%2Fc.mjpg"' in body
    status, headers, body = get(base + "/snapshot/a%20b%2Fc.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body == jpeg
    status, headers, body = get(base + "/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    info = json.loads(body)
    assert info["streams"]["a b/c"]["last_seq"] == 3 and info["uptime_s"] >= 0
    assert info["streams"]["a b/c"]["e2e_latency_p50_ms"] == 40.0
    status, headers, body = get(base + "/healthz")
    assert status == 200 and body == b"ok\n"
    for path in (
        "/nope",
        "/snapshot/other.jpg",
        "/stream/other.mjpg",
        "/stream/.mjpg",
        "/snapshot/%ff.jpg",
        "/status.json/x",
        "/../etc/passwd",
    ):
        status, headers, _ = get(base + path)
        assert status == 404, path
        assert headers["X-Content-Type-Options"] == "nosniff"


def test_dashboard_page_loads_script_and_style_only_from_the_viewer(web):
    hub, base = web
    hub.publish("cam", jpeg_of(source_image()), seq=1, results=[face()], model="m1")
    status, headers, body = get(base + "/")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    page = body.decode()
    assert '<script src="/static/dashboard.js" defer></script>' in page
    assert page.count("<script") == 1 and "<style" not in page and " style=" not in page
    assert 'data-stream="cam"' in page and 'class="timeline"' in page and "data-recorder" not in page
    for path, kind in (("/static/dashboard.js", "text/javascript"), ("/static/dashboard.css", "text/css")):
        status, headers, body = get(base + path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and len(body) > 500
        assert b"http://" not in body and b"https://" not in body  # no CDN
    assert get(base + "/static/nope.js")[0] == 404
    linked = render_page(["cam"], recorder_url="http://127.0.0.1:8081/")
    assert 'data-recorder="http://127.0.0.1:8081"' in linked


def test_panel_reports_tracks_or_raw_faces_and_a_numbered_timeline():
    now = [100.0]
    hub = StreamHub(clock=lambda: now[0])
    hub.publish("cam", b"jpeg", seq=1, results=[face("Sad", 0.6)], model="m1", latency_s=0.03)
    raw = hub.panel("cam")
    assert raw["source"] == "classifier" and raw["model"] == "m1" and raw["latency_ms"] == 30.0
    assert raw["faces"] == [
        {"track": None, "label": "Sad", "confidence": 0.6, "scores": face("Sad", 0.6).scores, "age_s": None}
    ]
    assert raw["emotions"] == list(EMOTIONS) and len(raw["timeline"]) == 1
    assert raw["timeline"][0]["shares"][EMOTIONS.index("Sad")] == 0.6
    for step in range(1, 11):  # 2 s of frames at 20 fps
        now[0] = 100.0 + step * 0.2
        hub.publish("cam", b"jpeg", seq=1 + step, results=tracks_header(step).results, model="m1")
    panel = hub.panel("cam")
    assert panel["source"] == "tracker"
    assert panel["faces"][0] == {
        "track": "3",
        "label": "Happy",
        "confidence": 0.82,
        "scores": tracks_header(0).results[0].smoothed_scores,
        "age_s": 4.0,
    }
    numbers = [p["n"] for p in panel["timeline"]]
    assert numbers == list(range(1, len(numbers) + 1)) and 4 <= len(numbers) <= 6
    assert [p["n"] for p in hub.panel("cam", after_point=numbers[-2])["timeline"]] == numbers[-1:]
    assert panel["timeline"][-1]["shares"][EMOTIONS.index("Happy")] == 0.82
    hub.publish("cam", b"jpeg", seq=20, results=[], model="m1")
    assert hub.panel("cam")["faces"] == [] and hub.panel("other") is None


def test_events_stream_json_updates_to_a_reading_client(web):
    hub, base = web
    jpeg = jpeg_of(source_image())
    hub.publish("cam", jpeg, seq=0, results=[face("Happy")], model="m1")
    assert get(base + "/events/nope", timeout=10)[0] == 404  # after waiting for it to appear
    with urllib.request.urlopen(base + "/events/cam", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = []
        seq = 1
        while len(events) < 3:
            hub.publish("cam", jpeg, seq=seq, results=[face("Happy")], model="m1")
            seq += 1
            line = response.readline()
            if line.startswith(b"data: "):
                events.append(json.loads(line[6:]))
        assert all(e["stream"] == "cam" and e["faces"][0]["label"] == "Happy" for e in events)
        # each timeline point is sent once: the first update has the history, later ones news
        sent = [p["n"] for e in events for p in e["timeline"]]
        assert len(sent) == len(set(sent))
    assert wait_for(lambda: hub.status()["mjpeg_clients"] == 0, 5, what="the client slot back")


def read_mjpeg_parts(response, count: int) -> list[bytes]:
    """Read ``count`` JPEG parts of a multipart/x-mixed-replace response."""
    parts = []
    while len(parts) < count:
        line = response.readline()
        if not line:
            break
        if line.strip() != b"--frame":
            continue
        headers = {}
        while line := response.readline().strip():
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        assert headers["content-type"] == "image/jpeg"
        parts.append(response.read(int(headers["content-length"])))
    return parts


def test_mjpeg_client_gets_new_frames_and_may_disconnect(web):
    hub, base = web
    hub.publish("cam", b"\xff\xd8first", seq=0, results=[], model="m")
    stop = threading.Event()

    def keep_publishing():
        seq = 1
        while not stop.wait(0.02):
            hub.publish("cam", b"\xff\xd8next%d" % seq, seq=seq, results=[], model="m")
            seq += 1

    publisher = threading.Thread(target=keep_publishing, daemon=True)
    publisher.start()
    try:
        for _ in range(3):  # connect, read a little, hang up: nothing may break
            with urllib.request.urlopen(base + "/stream/cam.mjpg", timeout=3) as response:
                content_type = response.headers["Content-Type"]
                assert content_type == "multipart/x-mixed-replace; boundary=frame"
                parts = read_mjpeg_parts(response, 3)
            assert len(parts) == 3 and all(p.startswith(b"\xff\xd8") for p in parts)
        deadline = time.monotonic() + 3
        while hub.status()["mjpeg_clients"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert hub.status()["mjpeg_clients"] == 0
        assert get(base + "/healthz")[0] == 200
    finally:
        stop.set()
        publisher.join()


# --- the real process over real ZeroMQ -----------------------------------------------------


class Publisher(threading.Thread):
    """Sends a frame and its result every 30 ms, plus any queued extra messages."""

    def __init__(self, frames: zmq.Socket, results: zmq.Socket):
        super().__init__(daemon=True)
        self.frames, self.results = frames, results
        self.extra: deque[list] = deque()
        self.stop = threading.Event()
        self.jpeg = jpeg_of(source_image())

    def run(self):
        seq = 0
        while not self.stop.wait(0.03):
            captured = time.time()
            self.frames.send_multipart(encode(frame_header(seq, capture=captured), [self.jpeg]))
            self.results.send_multipart(encode(result_header(seq, [face("Happy", 0.87)], capture=captured)))
            while self.extra:
                self.frames.send_multipart(self.extra.popleft())
            seq += 1


def metric_total(text: str, name: str, **labels) -> float:
    return metric_sum(metric_samples(text), name, **labels)


@pytest.mark.slow
def test_viewer_process_end_to_end_over_zeromq(tmp_path):
    ctx = zmq.Context()
    base, frames, results = bind_broker_side(ctx)
    proc, log_path, http_port, metrics_port = start_viewer_process(base, tmp_path)
    publisher = Publisher(frames, results)
    publisher.start()
    web, metrics_url = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"

    def metrics_text() -> str:
        return get(metrics_url)[2].decode()

    def reachable(url):
        try:
            return get(url, timeout=1)[0] == 200
        except OSError:
            assert proc.poll() is None, log_path.read_text()
            return False

    stream = None
    try:
        wait_for(lambda: reachable(web + "/healthz"), 10, interval=0.05, what="the viewer's web server")
        try:
            wait_for(lambda: reachable(web + "/snapshot/cam.jpg"), 30, interval=0.05, what="a first frame")
        except AssertionError as error:
            raise AssertionError(f"{error}; the viewer's log:\n{log_path.read_text()[-3000:]}") from None
        source = source_image()
        stream = urllib.request.urlopen(web + "/stream/cam.mjpg", timeout=5)
        parts = read_mjpeg_parts(stream, 3)
        assert len(parts) == 3
        images = [cv2.imdecode(np.frombuffer(p, np.uint8), cv2.IMREAD_COLOR) for p in parts]
        assert all(img is not None and img.shape == source.shape for img in images)
        assert box_border_difference(images[-1], source) > 30

        info = json.loads(get(web + "/status.json")[2])["streams"]["cam"]
        assert info["frames_shown"] >= 3 and info["model"] == "test-v1"
        assert info["labels"][0]["label"] == "Happy"
        assert info["e2e_latency_p50_ms"] is not None and info["last_frame_age_s"] < 2

        text = metrics_text()
        assert metric_total(text, "emotion_viewer_frames_total", stream="cam") > 0
        assert metric_total(text, "emotion_e2e_latency_seconds_count") > 0
        assert metric_total(text, "emotion_messages_rejected_total", service="viewer") == 0

        publisher.extra.extend(
            [
                [b"cam", os.urandom(64)],
                [b"cam", msgpack.packb({"v": 99, "kind": "frame", "stream": "cam"}), b"x"],
                encode(result_header(1, [face()])),
            ]
        )  # a result on the frames channel
        wait_for(
            lambda: metric_total(metrics_text(), "emotion_messages_rejected_total", service="viewer") >= 3,
            10,
            interval=0.05,
            what="rejected messages counted",
        )
        text = metrics_text()
        assert metric_total(text, "emotion_messages_rejected_total", service="viewer", reason="version") == 1
        assert metric_total(text, "emotion_messages_rejected_total", service="viewer", reason="kind") == 1
        shown = metric_total(text, "emotion_viewer_frames_total", stream="cam")
        wait_for(
            lambda: metric_total(metrics_text(), "emotion_viewer_frames_total", stream="cam") > shown + 3,
            10,
            interval=0.05,
            what="frames after garbage",
        )
        assert len(read_mjpeg_parts(stream, 2)) == 2

        started = time.monotonic()  # an MJPEG client is still connected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0, log_path.read_text()
        assert time.monotonic() - started < 5
    finally:
        publisher.stop.set()
        publisher.join()
        if stream is not None:
            stream.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        frames.close()
        results.close()
        ctx.term()


@pytest.mark.slow
def test_window_without_gui_support_exits_with_a_clear_message():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.viewer",
            "--window",
            "--metrics-port",
            "0",
            "--http-port",
            str(free_port()),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "opencv-python" in done.stderr and "--window" in done.stderr


def test_streams_that_come_and_go_leave_nothing_in_the_viewer():
    """100 stream ids, each shown for a moment (a client watching one of them), then silent:
    every buffer and label goes, the client's stream ends, and each is counted."""
    from services.viewer.hub import StreamClosed
    from services.viewer.service import EVICTED

    clock = FakeClock()
    hub, rejects = StreamHub(clock=clock), Rejects()
    viewer = ViewerService(ViewerSettings(idle_s=5.0, max_streams=16), hub, rejects, clock=clock)
    before = EVICTED._value.get()
    jpeg = jpeg_of(source_image())
    for i in range(100):
        viewer.on_frame(encode(frame_header(0, stream=f"cam-{i}"), [jpeg]))
        viewer.on_tracks(encode(result_header(0, [face()], stream=f"cam-{i}")))
        viewer.flush()
        clock.now += 1.0
    assert 0 < len(hub.streams()) <= 6 and viewer.joiner.dropped["streams"] == 0
    watched = hub.streams()[-1]
    clock.now += 10
    viewer.flush()
    assert hub.streams() == [] and viewer.joiner.streams == [] and viewer._tracked == {}
    assert EVICTED._value.get() - before == 100
    with pytest.raises(StreamClosed):
        hub.wait_frame(watched, 0, 0.1)
