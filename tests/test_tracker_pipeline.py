"""The tracker and the recorder in a real pipeline: real processes, real ZeroMQ, a real clip.

One pipeline (two classifier replicas, the tracker, the recorder) plays the clip once, in the
module fixture ``played``, and every test here reads what it published: one face is one
track with its events, both replicas answer, the recorder's API serves what the tracker
published, and malformed messages are counted. A new check of a clip through the tracker or
the recorder takes ``played`` instead of starting a pipeline of its own."""

from __future__ import annotations

import signal
import sqlite3
from collections import Counter
from contextlib import closing
from types import SimpleNamespace

import pytest

from services.common.protocol import KIND_TRACKS
from tests.support import free_port, media, metric_sum, wait_for
from tests.support.pipeline import Collector, Pipeline, events, play_clip_through, send_garbage, tracked_faces
from tests.support.recorder import check_recorded_as_published

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


def recorder_args(db, api: int) -> tuple:
    return ("--database", str(db), "--api-port", str(api), "--sample-hz", "0")


@pytest.fixture(scope="module")
def played(tmp_path_factory, tiny_registry):
    """The pipeline every test below reads: two classifier replicas, the tracker and the
    recorder (``--sample-hz 0``), after the clip's first 150 frames went through it once."""
    tmp_path = tmp_path_factory.mktemp("tracker-pipeline")
    clip = media("woman2.mp4")
    generous = ("--max-age-ms", "3000")
    pipeline = Pipeline(
        tmp_path,
        tiny_registry,
        classifiers=2,
        detector_args=(*generous, "--no-newest-only"),
        classifier_args=generous,
    )
    api = free_port()
    results = tracks = None
    try:
        tracker = pipeline.start("tracker")
        recorder = pipeline.start("recorder", *recorder_args(tmp_path / "recorder.db", api))
        wait_for(
            lambda: pipeline.scrape("tracker") and pipeline.scrape("recorder"),
            60,
            what="the tracker and the recorder",
        )
        results, tracks = play_clip_through(pipeline, clip, 150)
        yield SimpleNamespace(
            pipeline=pipeline,
            results=results,
            tracks=tracks,
            api=api,
            tracker=tracker,
            recorder=recorder,
            db=tmp_path / "recorder.db",
        )
    finally:
        for collector in (results, tracks):
            if collector is not None:
                collector.close()
        pipeline.stop()


@pytest.mark.timeout(300)
def test_one_face_in_a_clip_is_one_track_with_events(played):
    check_one_person(played.results, played.tracks)
    stats = played.pipeline.scrape("tracker")
    assert metric_sum(stats, "emotion_tracker_tracks_started_total") == len(
        events(played.tracks, "track_started")
    )
    assert metric_sum(stats, "emotion_tracker_label_changes_total", kind="raw") >= metric_sum(
        stats, "emotion_tracker_label_changes_total", kind="smoothed"
    )
    # the viewer draws and lists the tracks
    view = played.pipeline.scrape("viewer")
    assert metric_sum(view, "emotion_messages_rejected_total") == 0


@pytest.mark.timeout(300)
def test_two_classifier_replicas_still_give_one_track(played):
    check_one_person(played.results, played.tracks)
    for replica in ("classifier#0", "classifier#1"):
        assert metric_sum(played.pipeline.scrape(replica), "emotion_classifier_faces_total") > 0


@pytest.mark.timeout(300)
def test_a_clip_is_recorded_as_published(played):
    pipeline = played.pipeline
    wait_for(lambda: events(played.tracks, "track_ended"), 10, what="the track to end")
    published = [h for _, h in played.tracks.arrivals]
    sent_events = [h.event for h in published if h.kind != KIND_TRACKS]
    wait_for(
        lambda: (
            metric_sum(pipeline.scrape("recorder"), "emotion_recorder_rows_written_total", table="events")
            >= len(sent_events)
        ),
        10,
        what="the recorder to catch up",
    )
    check_recorded_as_published(played.api, published)
    assert (
        metric_sum(
            pipeline.scrape("recorder"),
            "emotion_recorder_api_requests_total",
            route="/api/tracks",
            status="200",
        )
        >= 2
    )


@pytest.mark.timeout(300)
def test_malformed_messages_are_counted_and_nobody_falls_over(played):
    """Last in this file: the garbage goes into the shared pipeline after the checks above."""
    pipeline = played.pipeline
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
    wait_for(
        lambda: (
            metric_sum(pipeline.scrape("recorder"), "emotion_messages_rejected_total", service="recorder")
            >= 10
        ),
        10,
        what="the recorder to count the garbage",
    )
    stats = pipeline.scrape("recorder")
    assert metric_sum(stats, "emotion_recorder_write_errors_total") == 0
    assert metric_sum(stats, "emotion_recorder_database_bytes") > 0
    assert played.tracker.alive() and played.recorder.alive()


def open_tracks(db, stream: str) -> list[tuple]:
    """(track, frames of it stored) of the stream's tracks with no end."""
    with closing(sqlite3.connect(db)) as connection:
        return connection.execute(
            "SELECT t.track, count(o.id) FROM tracks t JOIN observations o ON o.track_id = t.id "
            'WHERE t.stream = ? AND t."end" IS NULL GROUP BY t.id',
            (stream,),
        ).fetchall()


def in_view(db, stream: str) -> list[tuple]:
    """Wait for a face of the stream to be a track stored with some frames, still open."""
    return wait_for(
        lambda: [row for row in open_tracks(db, stream) if row[1] >= 10],
        30,
        what=f"an open track of {stream} with frames stored",
    )


def restart(pipeline, process, *args):
    pipeline.services.remove(process)
    return pipeline.start(process.name, *args)


@pytest.mark.timeout(300)
def test_every_track_ends_on_sigint_and_sigterm_and_after_kill_9(played):
    """Last in this file: a face in view of a looping clip while the tracker and the
    recorder are stopped together, by SIGINT, then by SIGTERM: no track stays open, and the
    tracker's track_ended events are recorded. Then both are killed with SIGKILL: the tracks
    stay open until the recorder starts again and closes them from their observations."""
    pipeline, db = played.pipeline, played.db
    tracker, recorder = played.tracker, played.recorder
    stream = "stops"
    pipeline.start(
        "capture#stops", "--source", str(media("woman2.mp4")), "--stream", stream, "--fps", "15", "--loop"
    )
    for how in (signal.SIGINT, signal.SIGTERM):
        ending = {track for track, _ in in_view(db, stream)}
        for process in (tracker, recorder):
            process.proc.send_signal(how)
        for process in (tracker, recorder):
            assert process.proc.wait(15) == 0, process.output()[-2000:]
        assert open_tracks(db, stream) == [], how
        with closing(sqlite3.connect(db)) as connection:
            ended = {
                track
                for (track,) in connection.execute(
                    "SELECT track FROM events WHERE stream = ? AND name = 'track_ended'", (stream,)
                )
            }
        assert ending <= ended, (how, ending, ended)
        tracker = restart(pipeline, tracker)
        recorder = restart(pipeline, recorder, *recorder_args(db, played.api))
    in_view(db, stream)
    for process in (tracker, recorder):
        process.proc.kill()
        process.proc.wait(15)
    left_open = open_tracks(db, stream)
    assert left_open
    recorder = restart(pipeline, recorder, *recorder_args(db, played.api))
    wait_for(lambda: not open_tracks(db, stream), 30, what="the restarted recorder to close the tracks")
    with closing(sqlite3.connect(db)) as connection:
        rows = connection.execute(
            'SELECT track, "end", last_seen, frames, dominant FROM tracks WHERE stream = ?', (stream,)
        ).fetchall()
    closed = [row[1:] for row in rows if row[0] in {track for track, _ in left_open}]
    assert closed and all(end == last and frames and dominant for end, last, frames, dominant in closed), (
        closed
    )
