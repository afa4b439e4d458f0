"""Analyze: flow control and ordering as plain functions; whole videos through real
pipelines it starts itself (real processes, real ZeroMQ)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from services.analyze.job import Collector
from services.analyze.outputs import CSV_COLUMNS, track_summaries, write_csv
from services.common.flow import Ledger
from services.common.protocol import EMOTIONS, FaceResult, Result
from tests.support import ROOT, media, metric_sum
from tests.support.pipeline import PageWatcher, Pipeline


def result(seq, boxes=((100, 100, 80, 80),)):
    scores = [0.1] * 6 + [0.4]
    faces = [FaceResult(tuple(b), "Neutral", 0.4, scores) for b in boxes]
    return Result(
        "job:x", seq, 640, 360, {"capture": 1e9 + seq}, boxes=[f.box for f in faces], results=faces, model="m"
    )


# --- flow control and order ----------------------------------------------------------------


def test_ledger_bounds_frames_in_flight_and_resends_then_gives_up():
    ledger = Ledger(window=2, resend_s=1.0, attempts=2)
    ledger.sent(0, ["f0"], 0.0)
    assert ledger.room()
    ledger.sent(1, ["f1"], 0.0)
    assert not ledger.room()
    assert ledger.answer(1) and not ledger.answer(1) and not ledger.answer(7)
    assert ledger.due_again(0.5) == []
    assert ledger.due_again(1.0) == [(0, ["f0"])]  # second send
    assert ledger.due_again(2.0) == [] and 0 in ledger.given_up  # out of attempts
    assert "2 sends" in ledger.given_up[0] and ledger.room()


def test_collector_tracks_in_frame_order_whatever_order_answers_come_in():
    collector = Collector(fps=10.0)
    for seq in (2, 0, 3):
        collector.add(result(seq))
    collector.drain()
    assert [r.index for r in collector.rows] == [0]  # 1 is still missing
    collector.give_up(1, "no result")
    collector.add(result(4))
    collector.drain()
    assert [r.index for r in collector.rows] == [0, 1, 2, 3, 4]
    assert collector.rows[1].missing == "no result" and collector.rows[1].faces == []
    assert collector.rows[3].time_s == pytest.approx(0.3)  # the video's clock
    assert [f.track for f in collector.rows[3].faces] == ["1"]
    collector.finish()
    ended = [e for e in collector.events if e.name == "track_ended"]
    assert len(ended) == 1 and ended[0].summary.end == pytest.approx(0.4)


def test_csv_has_a_row_per_face_and_one_per_empty_or_missing_frame(tmp_path):
    collector = Collector(fps=10.0)
    collector.add(result(0, boxes=((10, 10, 40, 40), (100, 10, 40, 40))))
    collector.add(result(1, boxes=()))
    collector.give_up(2, "no result after 4 sends")
    collector.drain()
    path = tmp_path / "frames.csv"
    assert write_csv(path, collector.rows, scale=0.5) == 4
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == CSV_COLUMNS
    assert [r["frame"] for r in rows] == ["0", "0", "1", "2"]
    assert rows[0]["box"] == "(20, 20, 80, 80)" and rows[0]["w"] == "80"  # original pixels
    assert rows[0]["neutral"] == "0.4000" and rows[0]["label"] == "Neutral"
    assert rows[2]["label"] == "" and rows[3]["missing"] == "no result after 4 sends"


def test_track_summaries_count_changes_per_person():
    collector = Collector(fps=10.0)
    for seq in range(5):
        collector.add(result(seq))
    collector.drain()
    collector.finish()
    tracks = track_summaries(collector.events)
    assert [t["track"] for t in tracks] == ["1"] and tracks[0]["frames"] == 4
    assert set(tracks[0]["shares"]) == set(EMOTIONS)


# --- whole videos through real pipelines -----------------------------------------------------


def short_clip(path, frames: int, codec: str = "mp4v") -> int:
    source = cv2.VideoCapture(str(media("woman2.mp4")))
    fps = source.get(cv2.CAP_PROP_FPS)
    writer = None
    for _ in range(frames):
        ok, frame = source.read()
        assert ok
        if writer is None:
            writer = cv2.VideoWriter(
                str(path), cv2.VideoWriter_fourcc(*codec), fps, (frame.shape[1], frame.shape[0])
            )
        writer.write(frame)
    writer.release()
    return int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT))


def analyze(video, out, registry, *args, timeout=240):
    """The analyze command with a pipeline of its own."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.analyze",
            str(video),
            "--out",
            str(out),
            "--pipeline",
            "start",
            "--registry",
            str(registry),
            "--no-progress",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_outputs(out, frames: int) -> dict:
    rows = list(csv.DictReader((out / "frames.csv").open()))
    assert sorted({int(r["frame"]) for r in rows}) == list(range(frames))
    assert all(r["missing"] == "" for r in rows)
    video = cv2.VideoCapture(str(out / "annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == frames
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "tracks.json").read_text())
    assert summary["frames_labelled"] == frames and not summary["partial"]
    assert summary["frames_with_faces"] >= 0.9 * frames
    assert len(summary["tracks"]) >= 1 and summary["tracks"][0]["frames"] >= 0.8 * frames
    return summary


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_every_frame_is_labelled_by_a_running_pipeline_with_replicas_and_a_live_stream(
    tmp_path, tiny_registry
):
    """Two detectors and two classifiers on their defaults (newest frame only, 500 ms age
    limit) serve a live stream and the job at once; the job still gets every frame."""
    clip = tmp_path / "clip.mp4"
    frames = short_clip(clip, 45)
    pipeline = Pipeline(tmp_path, tiny_registry, detectors=2, classifiers=2)
    watcher = PageWatcher(f"http://127.0.0.1:{pipeline.http_port}/")
    try:
        watcher.start()  # someone looks at the live stream
        pipeline.start("capture", "--source", "demo", "--stream", "live")
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.analyze",
                str(clip),
                "--out",
                str(tmp_path / "out"),
                "--pipeline",
                "running",
                "--base-port",
                str(pipeline.base),
                "--no-progress",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{frames} of {frames} frames labelled" in done.stdout
        check_outputs(tmp_path / "out", frames)
        assert (
            sum(
                metric_sum(pipeline.scrape(f"detector#{i}"), "emotion_detector_frames_total") > 0
                for i in range(2)
            )
            == 2
        )
        assert metric_sum(pipeline.scrape("viewer"), "emotion_viewer_frames_total", stream="live") > 0
    finally:
        watcher.halt.set()
        pipeline.stop()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_truncated_video_gives_a_partial_result_marked_as_such(tmp_path, tiny_registry):
    clip = tmp_path / "clip.avi"
    frames = short_clip(clip, 40, codec="MJPG")
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) // 2])
    done = analyze(clip, tmp_path / "out", tiny_registry)
    summary = json.loads((tmp_path / "out" / "tracks.json").read_text())
    assert done.returncode == 3, done.stderr[-3000:]
    assert "partial result" in done.stderr and summary["partial"]
    assert summary["frames_in_header"] == frames and 0 < summary["frames"] < frames
    assert "truncated" in summary["truncated"]
    rows = list(csv.DictReader((tmp_path / "out" / "frames.csv").open()))
    assert sorted({int(r["frame"]) for r in rows}) == list(range(summary["frames"]))


@pytest.mark.slow
def test_a_missing_or_unreadable_video_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "services.analyze", str(tmp_path / "nope.mp4")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "nope.mp4: no such video file" in done.stderr
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))
    done = subprocess.run(
        [sys.executable, "-m", "services.analyze", str(junk)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "junk.mp4: cannot be read as a video" in done.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.analyze",
            str(media("woman2.mp4")),
            "--pipeline",
            "running",
            "--base-port",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 78 and "no broker answers at 127.0.0.1:1" in done.stderr
