"""One palette for the seven emotions: the viewer's boxes, the dashboard, the recorder's
charts and analyze's timeline all draw each emotion in the same colour."""

from __future__ import annotations

import itertools
import json
import re
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np

from services.analyze.job import FrameRow
from services.analyze.outputs import write_timeline
from services.common.palette import PALETTE, UNKNOWN, bgr, hex_colour, hex_colours
from services.common.protocol import EMOTIONS, FaceResult, TrackedFace
from services.recorder.plots import timeline_png
from services.viewer.draw import draw_results
from services.viewer.hub import StreamHub
from services.viewer.web import STATIC, render_page, start_web_server, stop_web_server

BOX = (100, 60, 120, 120)
# Machado et al. (2009) simulations of full protanopia, deuteranopia and tritanopia
# (linear RGB), to check that the colours stay apart for colour-blind readers too.
VISION = {
    "normal": np.eye(3),
    "protan": np.array(
        [[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]]
    ),
    "deutan": np.array(
        [[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]]
    ),
    "tritan": np.array(
        [[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]]
    ),
}


def rgb(hex_value: str) -> tuple[int, int, int]:
    return tuple(int(hex_value[i : i + 2], 16) for i in (1, 3, 5))


def lab(colour: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of a linear-RGB colour."""
    xyz = (
        np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
        @ colour
        / np.array([0.95047, 1.0, 1.08883])
    )
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def linear(hex_value: str) -> np.ndarray:
    c = np.array(rgb(hex_value)) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def pixels_of(image_bgr: np.ndarray, hex_value: str) -> int:
    """How many pixels of a BGR image have exactly this colour."""
    return int(np.all(image_bgr == bgr_of(hex_value), axis=2).sum())


def bgr_of(hex_value: str) -> tuple[int, int, int]:
    return tuple(reversed(rgb(hex_value)))


# --- the palette itself -----------------------------------------------------------------------


def test_every_emotion_has_a_colour():
    assert tuple(PALETTE) == EMOTIONS  # EMOTIONS order, nothing else
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in PALETTE.values())
    assert hex_colours() == [PALETTE[e] for e in EMOTIONS]
    assert len(set(hex_colours())) == len(EMOTIONS) and UNKNOWN not in hex_colours()
    assert hex_colour("Joy") == UNKNOWN and bgr("Joy") == (255, 255, 255)


def test_bgr_is_the_hex_colour_reversed():
    assert bgr("Happy") == bgr_of(PALETTE["Happy"])
    for emotion in EMOTIONS:
        b, g, r = bgr(emotion)
        assert f"#{r:02x}{g:02x}{b:02x}" == PALETTE[emotion]
        assert all(isinstance(v, int) for v in (b, g, r))


def test_happy_is_yellow_and_disgust_green():
    red, green, blue = rgb(PALETTE["Happy"])
    assert red > 200 and green > 180 and blue < 80
    red, green, blue = rgb(PALETTE["Disgust"])
    assert green > red + 60 and green > blue + 40


def test_colours_stay_apart_for_normal_and_colour_blind_vision():
    """CIE76 distance of every pair, under each kind of vision, and from the dashboard's
    dark background (#191b21)."""
    for vision, matrix in VISION.items():
        seen = {e: lab(np.clip(matrix @ linear(c), 0, 1)) for e, c in PALETTE.items()}
        for a, b in itertools.combinations(EMOTIONS, 2):
            assert np.linalg.norm(seen[a] - seen[b]) >= 20, (vision, a, b)
    background = lab(linear("#191b21"))
    assert all(np.linalg.norm(lab(linear(c)) - background) >= 35 for c in PALETTE.values())


# --- everything that draws uses it ------------------------------------------------------------


def test_viewer_draws_each_emotion_in_its_palette_colour():
    source = np.full((640, 640, 3), 100, np.uint8)  # lines 3 px wide: a solid middle
    x, y, w, h = box = (160, 160, 320, 320)
    for emotion in EMOTIONS:
        scores = [0.0] * len(EMOTIONS)
        scores[EMOTIONS.index(emotion)] = 0.9
        drawn = draw_results(
            source, [FaceResult(box=box, label=emotion, confidence=0.9, scores=scores)], "m1"
        )
        assert tuple(drawn[y + h // 2, x]) == bgr(emotion), emotion  # left edge
        assert tuple(drawn[y + h - 1, x + w // 2]) == bgr(emotion), emotion  # bottom edge


def one_emotion_scores(emotion: str) -> list[float]:
    return [1.0 if e == emotion else 0.0 for e in EMOTIONS]


def test_recorder_chart_draws_in_the_palette():
    track = {"stream": "main", "track": "1", "start": 1_700_000_000.0}
    for emotion in ("Happy", "Disgust"):
        points = [(1_700_000_000.0 + t, one_emotion_scores(emotion)) for t in range(10)]
        png = cv2.imdecode(np.frombuffer(timeline_png(track, points), np.uint8), cv2.IMREAD_COLOR)
        assert pixels_of(png, PALETTE[emotion]) > 10_000, emotion  # the filled band
        others = [c for e, c in PALETTE.items() if e != emotion]
        assert all(pixels_of(png, c) < 500 for c in others), emotion  # legend swatches only
        assert pixels_of(png, "#2ca02c") == 0  # the old chart's green "Happy"


def test_analyze_timeline_draws_in_the_palette(tmp_path):
    for emotion in ("Happy", "Disgust"):
        scores = one_emotion_scores(emotion)
        rows = [
            FrameRow(
                index=i,
                time_s=i / 10,
                faces=[
                    TrackedFace(
                        box=BOX,
                        label=emotion,
                        confidence=1.0,
                        scores=scores,
                        track="1",
                        smoothed_label=emotion,
                        smoothed_scores=scores,
                    )
                ],
            )
            for i in range(20)
        ]
        path = tmp_path / f"{emotion}.png"
        write_timeline(path, rows, "clip.mp4")
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert pixels_of(image, PALETTE[emotion]) > 10_000, emotion


class _Body(HTMLParser):
    palette = None

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.palette = dict(attrs).get("data-palette")


def test_dashboard_gets_the_palette_from_the_viewer():
    hub = StreamHub()
    server, _ = start_web_server("127.0.0.1", 0, hub)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(base + "/", timeout=3) as response:
            page = response.read().decode()
        with urllib.request.urlopen(base + "/static/dashboard.js", timeout=3) as response:
            script = response.read().decode()
    finally:
        stop_web_server(server, hub)
    body = _Body()
    body.feed(page)
    assert json.loads(body.palette) == PALETTE
    assert list(json.loads(body.palette)) == list(EMOTIONS)
    body.feed(render_page(['"><script>']))  # escaped whatever the streams are
    assert json.loads(body.palette) == PALETTE
    assert "data-palette" in script or "dataset.palette" in script
    # its own colours: the axis text and the fallback for a label outside the palette
    assert set(re.findall(r"#[0-9a-fA-F]{3,8}\b", script)) == {"#6b717c", "#fff"}
    for emotion in EMOTIONS:  # no colour table of its own
        assert emotion not in script
        assert PALETTE[emotion] not in script
    assert script == (Path(STATIC) / "dashboard.js").read_text()
