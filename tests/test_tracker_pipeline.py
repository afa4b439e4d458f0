"""The tracker in a real pipeline: real processes, real ZeroMQ, a real clip."""

from __future__ import annotations

from collections import Counter

import pytest

from services.common.protocol import KIND_TRACKS
from tests.support import media, metric_sum, wait_for
from tests.support.pipeline import Collector, Pipeline, events, play_clip_through, send_garbage, tracked_faces

pytestmark = pytest.mark.slow


def check_one_person(results: Collector, tracks: Collector) -> None:
    """One face throughout: one track, tracks for every result, a start and an end."""
    wait_for(lambda: events(tracks, "track_ended"), 10, what="the track to end after the clip")
    answered = [h for _, h in results.arrivals if h.stream == "clip"]
    per_frame = [h for _, h in tracks.arrivals if h.kind == KIND_TRACKS]
    assert len(per_frame) >= 0.95 * len(answered), (len(per_frame), len(answered))
    ids = Counter(f.track for f in tracked_faces(tracks) if f.track is not None)
    assert ids, "no face was tracked"
    main, count = ids.most_common(1)[0]
    assert count >= 0.95 * sum(ids.values()), ids
    started, ended = events(tracks, "track_started"), events(tracks, "track_ended")
    assert started[0].track == main and len(started) <= 2, started
    assert {e.track for e in ended} == {e.track for e in started}
    summary = next(e.summary for e in ended if e.track == main)
    assert summary.frames >= 0.9 * count and summary.end > summary.start
    assert abs(sum(summary.shares) - 1) < 1e-3
    faces = [f for f in tracked_faces(tracks) if f.track == main]
    assert all(f.smoothed_label and len(f.smoothed_scores) == 7 for f in faces)
    assert faces[-1].age_s > faces[0].age_s


@pytest.mark.timeout(300)
def test_one_face_in_a_clip_is_one_track_with_events(tmp_path, tiny_registry):
    clip = media("woman2.mp4")
    generous = ("--max-age-ms", "3000")
    pipeline = Pipeline(
        tmp_path, tiny_registry, detector_args=(*generous, "--no-newest-only"), classifier_args=generous
    )
    tracker = pipeline.start("tracker")
    wait_for(lambda: pipeline.scrape("tracker"), 30, what="the tracker")
    results = tracks = None
    try:
        results, tracks = play_clip_through(pipeline, clip, 150)
        check_one_person(results, tracks)
        stats = pipeline.scrape("tracker")
        assert metric_sum(stats, "emotion_tracker_tracks_started_total") == len(
            events(tracks, "track_started")
        )
        assert metric_sum(stats, "emotion_tracker_label_changes_total", kind="raw") >= metric_sum(
            stats, "emotion_tracker_label_changes_total", kind="smoothed"
        )
        # the viewer draws and lists the tracks
        view = pipeline.scrape("viewer")
        assert metric_sum(view, "emotion_messages_rejected_total") == 0

        # malformed messages on both channels are counted, and nobody falls over
        send_garbage(pipeline, "results")
        send_garbage(pipeline, "tracks")
        wait_for(
            lambda: metric_sum(pipeline.scrape("tracker"), "emotion_messages_rejected_total") >= 10,
            10,
            what="the tracker to count the malformed results",
        )
        wait_for(
            lambda: metric_sum(pipeline.scrape("viewer"), "emotion_messages_rejected_total") >= 10,
            10,
            what="the viewer to count the malformed tracks",
        )
        assert tracker.alive()
    finally:
        for collector in (results, tracks):
            if collector is not None:
                collector.close()
        pipeline.stop()


@pytest.mark.timeout(300)
def test_two_classifier_replicas_still_give_one_track(tmp_path, tiny_registry):
    clip = media("woman2.mp4")
    generous = ("--max-age-ms", "3000")
    pipeline = Pipeline(
        tmp_path,
        tiny_registry,
        classifiers=2,
        detector_args=(*generous, "--no-newest-only"),
        classifier_args=generous,
    )
    pipeline.start("tracker")
    wait_for(lambda: pipeline.scrape("tracker"), 30, what="the tracker")
    results = tracks = None
    try:
        results, tracks = play_clip_through(pipeline, clip, 150)
        check_one_person(results, tracks)
        for replica in ("classifier#0", "classifier#1"):
            assert metric_sum(pipeline.scrape(replica), "emotion_classifier_faces_total") > 0
    finally:
        for collector in (results, tracks):
            if collector is not None:
                collector.close()
        pipeline.stop()
