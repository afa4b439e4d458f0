"""The viewer's dashboard in a real browser (Debian's chromium through Selenium), fed by a
real pipeline with a tracker playing a real clip."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from services.common.palette import PALETTE
from tests.support import media, wait_for
from tests.support.pipeline import Pipeline

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
PANEL_SCRIPT = """
const s = document.querySelector('section.stream[data-stream="main"]');
const text = (e) => (e ? e.textContent : "");
return {
  faces: [...s.querySelectorAll(".face")].map((f) => ({
    who: text(f.querySelector(".who")),
    emotions: [...f.querySelectorAll(".bars .emotion")].map(text),
    pcts: [...f.querySelectorAll(".bars .pct")].map(text),
    fills: [...f.querySelectorAll(".bar span")].map((b) => getComputedStyle(b).backgroundColor)})),
  meta: text(s.querySelector(".meta")),
  points: Number(s.querySelector("canvas.timeline").dataset.points || 0),
  legend: [...s.querySelectorAll(".legend li")].map(text),
  swatches: [...s.querySelectorAll(".legend li i")].map((i) => getComputedStyle(i).backgroundColor),
};"""
TRACK_TEXT = re.compile(r"^#\d+ (Angry|Disgust|Fear|Happy|Sad|Surprise|Neutral) \d{1,3}%$")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.mark.timeout(300)
def test_dashboard_shows_a_tracked_face_and_a_growing_timeline(tmp_path, tiny_registry, browser):
    clip = media("woman2.mp4")
    pipeline = Pipeline(tmp_path, tiny_registry)
    try:
        pipeline.start("tracker")
        wait_for(lambda: pipeline.scrape("tracker"), 30, what="the tracker")
        pipeline.start("capture", "--source", str(clip), "--stream", "main", "--loop")
        base = f"http://127.0.0.1:{pipeline.http_port}/"
        wait_for(
            lambda: "main" in (pipeline.scrape("viewer") and _streams(base)),
            60,
            what="the viewer to show the stream",
        )
        browser.get(base)

        def panel():
            """The panel as the page shows it now, read in one go (it re-renders 10x a second)."""
            return browser.execute_script(PANEL_SCRIPT)

        def tracked_face():
            return next((f for f in panel()["faces"] if TRACK_TEXT.match(f["who"])), None)

        face = wait_for(tracked_face, 60, interval=0.5, what="a tracked face in the panel")
        emotions = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
        assert face["emotions"] == emotions
        assert all(re.fullmatch(r"\d{1,3}%", p) for p in face["pcts"])
        state = panel()
        assert "fps" in state["meta"] and "tracked" in state["meta"]
        assert state["legend"] == emotions
        palette = [_css_rgb(PALETTE[emotion]) for emotion in emotions]  # the viewer's colours
        assert state["swatches"] == palette and face["fills"] == palette
        before = state["points"]
        wait_for(lambda: panel()["points"] >= before + 3, 20, interval=0.5, what="the timeline to grow")
        errors = [
            entry["message"]
            for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]
        ]
        assert not errors, errors  # no script error, no CSP refusal

        shot = Path(os.environ.get("EMOTION_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000

        browser.set_window_size(390, 844)  # phone width: no sideways scrolling
        time.sleep(0.5)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert tracked_face()
    finally:
        pipeline.stop()


def _css_rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)))


def _streams(base: str) -> str:
    from tests.support import http_get

    try:
        return http_get(base + "status.json").decode()
    except OSError:
        return ""
