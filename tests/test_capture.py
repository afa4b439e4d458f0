"""Capture: source selection, image folders/globs/files, video files, demo, helpers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from services.capture.frames import encode_frame, publish_every
from services.capture.sources import (
    Backoff,
    DemoSource,
    ImageSource,
    SourceError,
    VideoSource,
    fit_width,
    open_source,
)
from services.common.config import CONFIG_ERROR
from services.common.protocol import ENCODING_BGR, ENCODING_JPEG, KIND_FRAME, decode, decode_image
from services.detector.faces import DetectorSettings, detect_faces, load_cascade
from tests.support import Service, free_base_port, free_port, wait_for

COLOURS = {"a": (200, 30, 30), "b": (30, 200, 30), "c": (30, 30, 200)}


def solid(colour, width=64, height=48) -> np.ndarray:
    return np.full((height, width, 3), colour, np.uint8)


def close_to(image: np.ndarray, colour, tol=12) -> bool:
    return bool(np.all(np.abs(image.reshape(-1, 3).mean(axis=0) - np.array(colour)) < tol))


def read_all(source, limit=1000) -> list[np.ndarray]:
    frames = []
    while len(frames) < limit:
        frame = source.read()
        if frame is None:
            break
        frames.append(frame)
    return frames


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    # written out of order; read back in name order
    for name in ("c", "a", "b"):
        assert cv2.imwrite(str(folder / f"{name}.jpg"), solid(COLOURS[name]))
    (folder / "b-broken.jpg").write_bytes(b"not a jpeg at all")  # between b and c
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


# --- open_source ---------------------------------------------------------------------------


def test_demo():
    source = open_source("demo")
    assert isinstance(source, DemoSource)
    assert source.name == "demo" and not source.live and source.native_fps == 15.0


@pytest.mark.parametrize("spec,target", [("0", 0), ("2", 2)])
def test_camera_index(spec, target):
    source = open_source(spec)
    assert isinstance(source, VideoSource)
    assert source.target == target and isinstance(source.target, int)
    assert source.live and source.capture is None  # not opened
    assert spec in source.name


def test_camera_device_path():
    source = open_source("/dev/video0")
    assert isinstance(source, VideoSource)
    assert source.target == "/dev/video0" and source.live and source.capture is None


@pytest.mark.parametrize(
    "url",
    ["rtsp://x/y", "http://cam.local/video.mjpg", "HTTPS://cam.local/s", "udp://@:1234", "rtmp://host/live"],
)
def test_url(url):
    source = open_source(url)
    assert isinstance(source, VideoSource)
    assert source.target == url and source.live and source.capture is None
    assert url in source.name


def test_image_folder_in_name_order_skipping_unreadable(image_folder):
    source = open_source(str(image_folder))
    assert isinstance(source, ImageSource) and not source.live
    assert [p.rsplit("/", 1)[-1] for p in source.paths] == ["a.jpg", "b-broken.jpg", "b.jpg", "c.jpg"]
    source.open()
    frames = read_all(source)
    assert len(frames) == 3
    for frame, name in zip(frames, "abc"):
        assert frame.shape == (48, 64, 3)
        assert close_to(frame, COLOURS[name]), name
    assert source.read() is None
    # reopening starts from the first image again
    source.open()
    assert close_to(source.read(), COLOURS["a"])


def test_unreadable_file_in_the_middle_is_skipped(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    cv2.imwrite(str(folder / "1.png"), solid(COLOURS["a"]))
    (folder / "2.png").write_bytes(b"\x89PNG broken")
    cv2.imwrite(str(folder / "3.png"), solid(COLOURS["c"]))
    source = open_source(str(folder))
    source.open()
    frames = read_all(source)
    assert len(frames) == 2
    np.testing.assert_array_equal(frames[0], solid(COLOURS["a"]))  # PNG is lossless
    np.testing.assert_array_equal(frames[1], solid(COLOURS["c"]))


def test_a_folder_that_vanishes_while_it_is_opened_is_a_source_error(tmp_path, monkeypatch):
    """Between is_dir() and listing it, a folder can be removed (a camera's upload folder
    being replaced): that is a failing source, retried, not a crash of its camera."""
    folder = tmp_path / "pictures"
    folder.mkdir()

    def gone(self):
        raise FileNotFoundError(2, "No such file or directory", str(self))

    monkeypatch.setattr(type(folder), "iterdir", gone)
    with pytest.raises(SourceError, match="pictures cannot be read"):
        open_source(str(folder))


def test_glob(image_folder):
    source = open_source(str(image_folder / "[ab].jpg"))
    assert isinstance(source, ImageSource)
    assert [p.rsplit("/", 1)[-1] for p in source.paths] == ["a.jpg", "b.jpg"]
    source.open()
    frames = read_all(source)
    assert [close_to(f, COLOURS[n]) for f, n in zip(frames, "ab")] == [True, True]
    everything = open_source(str(image_folder / "*"))
    assert [p.rsplit("/", 1)[-1] for p in everything.paths] == ["a.jpg", "b-broken.jpg", "b.jpg", "c.jpg"]


def test_single_image_file(image_folder):
    path = str(image_folder / "b.jpg")
    source = open_source(path)
    assert isinstance(source, ImageSource) and source.paths == [path]
    assert path in source.name
    source.open()
    frame = source.read()
    assert frame is not None and close_to(frame, COLOURS["b"])
    assert source.read() is None


@pytest.mark.parametrize("suffix,fourcc", [(".avi", "MJPG"), (".mp4", "mp4v")])
def test_video_file(tmp_path, suffix, fourcc):
    path = tmp_path / f"clip{suffix}"
    colours = [(20 * i, 255 - 20 * i, 128) for i in range(10)]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip(f"OpenCV cannot write {fourcc} {suffix} here")
    for colour in colours:
        writer.write(solid(colour))
    writer.release()
    source = open_source(str(path))
    assert isinstance(source, VideoSource) and not source.live
    assert source.target == str(path)
    assert source.read() is None  # not opened yet
    source.open()
    try:
        assert source.native_fps == pytest.approx(10.0)
        frames = read_all(source)
        assert len(frames) == len(colours)
        for frame, colour in zip(frames, colours):
            assert frame.shape == (48, 64, 3)
            assert close_to(frame, colour, tol=20), colour
        assert source.read() is None
        assert source.read() is None
    finally:
        source.close()
    assert source.capture is None
    assert source.read() is None


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nothing-here.mp4")
    with pytest.raises(SourceError) as info:
        open_source(missing)
    assert missing in str(info.value) and "no such file" in str(info.value)


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images")
    with pytest.raises(SourceError) as info:
        open_source(str(folder))
    assert str(folder) in str(info.value)


def test_glob_matching_nothing(tmp_path):
    pattern = str(tmp_path / "*.jpg")
    with pytest.raises(SourceError) as info:
        open_source(pattern)
    assert pattern in str(info.value)


def test_video_file_that_cannot_be_opened(tmp_path):
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"definitely not a video" * 10)
    source = open_source(str(path))
    with pytest.raises(SourceError) as info:
        source.open()
    assert str(path) in str(info.value)
    assert source.capture is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_url_that_cannot_be_opened_fails_fast(scheme):
    url = f"{scheme}://127.0.0.1:{_closed_port()}/none"
    if scheme == "http":
        url += ".mjpg"
    source = open_source(url)
    outcome = {}

    def attempt():
        started = time.monotonic()
        try:
            source.open()
            outcome["error"] = None
        except SourceError as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        pytest.skip(f"OpenCV blocks for more than 10 s opening {url}")
    assert isinstance(outcome["error"], SourceError)
    assert url in str(outcome["error"])
    assert source.capture is None and source.read() is None


# --- the demo source -----------------------------------------------------------------------


@pytest.mark.slow
def test_demo_frames_contain_a_face():
    source = DemoSource()
    source.open()
    cascade = load_cascade()
    settings = DetectorSettings()
    found, previous, moved = 0, None, 0
    for _ in range(60):
        frame = source.read()
        assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
        found += len(detect_faces(frame, cascade, settings)) >= 1
        if previous is not None and not np.array_equal(frame, previous):
            moved += 1
        previous = frame
    assert found >= 54  # >= 90 % of 60 frames
    assert moved == 59  # every frame differs (motion + counter)
    source.open()  # reopening restarts the clock
    assert source.tick == 0


# --- helpers -------------------------------------------------------------------------------


def test_fit_width_downscales_keeping_aspect():
    frame = np.zeros((720, 1280, 3), np.uint8)
    out = fit_width(frame, 640)
    assert out.shape == (360, 640, 3)
    out = fit_width(np.zeros((1080, 1920, 3), np.uint8), 500)
    assert out.shape == (281, 500, 3)  # round(1080 * 500 / 1920) = 281.25
    assert fit_width(np.zeros((3000, 10, 3), np.uint8), 5).shape == (1500, 5, 3)
    assert fit_width(np.zeros((1, 5000, 3), np.uint8), 100).shape == (1, 100, 3)  # never 0
    assert fit_width(np.zeros((480, 640), np.uint8), 320).shape == (240, 320)


@pytest.mark.parametrize("max_width", [640, 641, 2000, 0, -1])
def test_fit_width_never_upscales(max_width):
    frame = np.zeros((480, 640, 3), np.uint8)
    assert fit_width(frame, max_width) is frame


def test_fit_width_keeps_content():
    frame = np.zeros((200, 400, 3), np.uint8)
    frame[:, 200:] = 255
    out = fit_width(frame, 100)
    assert out.shape == (50, 100, 3)
    assert np.all(out[:, :50] == 0) and np.all(out[:, 50:] == 255)


@pytest.mark.parametrize(
    "native,target,every",
    [
        (30, 15, 2.0),
        (25, 10, 2.5),
        (60, 24, 2.5),
        (30, 30, 1.0),
        (15, 30, 1.0),
        (0, 10, 1.0),
        (30, 0, 1.0),
        (-5, 10, 1.0),
        (30, -1, 1.0),
    ],
)
def test_publish_every(native, target, every):
    assert publish_every(native, target) == pytest.approx(every)


def test_backoff_doubles_up_to_max_and_resets():
    backoff = Backoff()
    assert [backoff.next() for _ in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    backoff.reset()
    assert backoff.next() == 0.5
    custom = Backoff(first=0.1, maximum=0.3)
    assert [custom.next() for _ in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    custom.reset()
    assert custom.next() == pytest.approx(0.1)


@pytest.mark.parametrize("encoding", [ENCODING_JPEG, ENCODING_BGR])
def test_encode_frame_decodes(encoding):
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (12, 16, 3), np.uint8)
    frame = cv2.resize(small, (320, 240), interpolation=cv2.INTER_LINEAR)
    before = time.time()
    parts = encode_frame(frame, "cam-7", 42, encoding, 90)
    assert parts[0] == b"cam-7"
    header, payloads = decode([bytes(memoryview(p).cast("B")) for p in parts], expect_kind=KIND_FRAME)
    assert (header.stream, header.seq, header.width, header.height, header.encoding) == (
        "cam-7",
        42,
        320,
        240,
        encoding,
    )
    assert before - 1 <= header.timestamps["capture"] <= time.time() + 1
    image = decode_image(header, payloads[0])
    assert image.shape == (240, 320, 3)
    if encoding == ENCODING_BGR:
        np.testing.assert_array_equal(image, frame)
    else:
        assert np.abs(image.astype(int) - frame.astype(int)).mean() < 4


def test_encode_frame_bgr_of_a_non_contiguous_view():
    frame = np.arange(100 * 80 * 3, dtype=np.uint32).astype(np.uint8).reshape(100, 80, 3)
    view = frame[10:60, 5:45]  # a view with row gaps
    assert not view.flags.c_contiguous
    parts = encode_frame(view, "s", 0, ENCODING_BGR, 85)
    header, payloads = decode([bytes(memoryview(p).cast("B")) for p in parts])
    assert (header.width, header.height) == (40, 50)
    np.testing.assert_array_equal(decode_image(header, payloads[0]), view)


def test_encode_frame_jpeg_quality_matters():
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (120, 160, 3), np.uint8)
    low = encode_frame(frame, "s", 0, ENCODING_JPEG, 20)[2]
    high = encode_frame(frame, "s", 0, ENCODING_JPEG, 95)[2]
    assert len(low) < len(high)


def test_a_file_is_decoded_on_one_thread(tmp_path):
    """Many cameras share one capture process: one decoding thread each (DECODE_THREADS)."""
    from services.capture.sources import DECODE_THREADS, VideoSource

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    source = VideoSource(str(path), live=False, name="clip")
    source.open()
    try:
        assert DECODE_THREADS == 1 and source.capture.get(cv2.CAP_PROP_N_THREADS) == 1
        assert source.skip() and source.read() is not None and source.skip() and not source.skip()
    finally:
        source.close()


def thread_niceness(pid: int) -> dict[str, set[int]]:
    """The nice values of a process's threads, by thread name (field 19 of each task's stat)."""
    out: dict[str, set[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        stat = (task / "stat").read_text()
        name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
        out.setdefault(name, set()).add(int(stat.rpartition(")")[2].split()[16]))
    return out


@pytest.mark.parametrize("mode", ["source", "inventory"])
def test_capture_reads_below_the_other_stages_but_sends_at_their_priority(tmp_path, mode):
    """--nice: the threads that read and decode (the main one, each camera's) run at that
    niceness; ZeroMQ's I/O thread, which moves the frames on, keeps the default, so frames
    already decoded leave even while the reading waits for a core."""
    if mode == "inventory":
        inventory = tmp_path / "cameras.yml"
        inventory.write_text("cameras:\n  - {id: one, source: demo}\n")
        source = ["--cameras", str(inventory)]
    else:
        source = ["--source", "demo"]
    args = [*source, "--nice", "7", "--base-port", str(free_base_port()), "--metrics-port", str(free_port())]
    service = Service("capture", args, tmp_path)
    try:
        threads = wait_for(
            lambda: (t := thread_niceness(service.pid)) and "ZMQbg/IO/0" in t and len(t) >= 3 and t,
            20,
            what="capture's threads",
        )
        assert threads["main"] == {7} and threads["ZMQbg/IO/0"] == {0}, threads
        if mode == "inventory":  # the camera's thread, started by the main one
            wait_for(lambda: 7 in thread_niceness(service.pid).get("python", set()), 20, what="camera")
    finally:
        service.stop()


@pytest.mark.parametrize("nice", ["-1", "20"])
def test_a_niceness_out_of_range_is_a_configuration_error(capsys, nice):
    from services.capture.options import parse_args, settings_from

    with pytest.raises(SystemExit) as stopped:
        settings_from(parse_args(["--nice", nice]))
    assert stopped.value.code == CONFIG_ERROR and f"--nice {nice} must be 0-19" in capsys.readouterr().err
