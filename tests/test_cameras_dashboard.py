"""The dashboard's camera tiles: /cameras.json joins the capture processes' camera states
with the streams the viewer receives, and in a real browser three cameras make three tiles,
a click opening one camera's panel alone."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from services.common.metrics import serve_metrics
from services.viewer.hub import StreamHub
from services.viewer.web import start_web_server, stop_web_server
from tests.support import free_port, wait_for
from tests.test_viewer import face, get, jpeg_of, source_image

LIVE = {
    "cameras": [
        {"id": "lobby", "name": "Lobby", "location": "A", "state": "up", "fps": 14.9, "last_error": ""},
        {"id": "yard", "name": "Yard", "location": "", "state": "retrying", "fps": 0.0, "last_error": "x"},
    ]
}


@pytest.fixture
def site():
    """A viewer receiving streams lobby and lab (lobby with two faces), beside a capture
    endpoint that runs lobby and yard."""
    port = free_port()
    capture = serve_metrics(port, pages={"/cameras": lambda: LIVE})
    hub = StreamHub()
    server, _ = start_web_server("127.0.0.1", 0, hub, capture_urls=[f"http://127.0.0.1:{port}"])
    jpeg = jpeg_of(source_image())
    halt = threading.Event()

    def publish():
        seq = 0
        while not halt.wait(0.1):
            seq += 1
            hub.publish("lobby", jpeg, seq=seq, results=[face(), face("Sad")], model="m")
            hub.publish("lab", jpeg, seq=seq, results=[], model="m")

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    wait_for(lambda: set(hub.streams()) == {"lobby", "lab"}, 5, what="both streams")
    yield f"http://127.0.0.1:{server.server_address[1]}"
    halt.set()
    thread.join(2)
    stop_web_server(server, hub)
    capture.shutdown()
    capture.server_close()


def test_tiles_join_the_cameras_and_the_streams(site):
    status, headers, body = get(site + "/cameras.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    tiles = {t["id"]: t for t in json.loads(body)["cameras"]}
    assert list(tiles) == ["lobby", "yard", "lab"]
    assert tiles["lobby"] == {
        "id": "lobby",
        "name": "Lobby",
        "location": "A",
        "state": "up",
        "fps": 14.9,
        "last_error": "",
        "people": 2,
        "shown": True,
    }
    assert tiles["yard"]["state"] == "retrying" and not tiles["yard"]["shown"]
    assert tiles["lab"]["state"] == "up" and tiles["lab"]["name"] == "lab" and tiles["lab"]["people"] == 0
    assert b'<nav class="tiles"' in get(site + "/")[2]


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TILES_SCRIPT = """
return {
  tiles: [...document.querySelectorAll(".tile")].map((t) => ({
    stream: t.dataset.stream, state: t.querySelector(".state").textContent,
    people: t.querySelector(".people").textContent, pressed: t.getAttribute("aria-pressed")})),
  open: [...document.querySelectorAll("section.stream")].filter((s) => !s.hidden)
    .map((s) => s.dataset.stream),
};"""


@pytest.mark.slow
def test_three_cameras_make_three_tiles_and_a_click_opens_one(site):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    try:
        browser.get(site + "/")
        page = lambda: browser.execute_script(TILES_SCRIPT)  # noqa: E731
        wait_for(lambda: len(page()["tiles"]) == 3, 10, interval=0.2, what="three tiles")
        state = page()
        assert [(t["stream"], t["people"]) for t in state["tiles"]] == [
            ("lobby", "2 people"),
            ("yard", "0 people"),
            ("lab", "0 people"),
        ]
        assert state["tiles"][0]["state"].startswith("up") and state["tiles"][1]["state"] == "retrying"
        assert state["open"] == ["lobby"]
        browser.find_element("css selector", '.tile[data-stream="lab"]').click()
        wait_for(lambda: page()["open"] == ["lab"], 5, interval=0.1, what="lab's panel alone")
        assert browser.current_url.endswith("#lab")
        wait_for(lambda: page()["tiles"][2]["pressed"] == "true", 5, interval=0.1, what="lab's tile pressed")
        errors = [
            e["message"]
            for e in browser.get_log("browser")
            if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]
        ]
        assert not errors, errors
    finally:
        browser.quit()
