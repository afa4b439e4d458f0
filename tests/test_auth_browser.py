"""Signing in with a real browser (Debian's chromium through Selenium): the viewer sends it
to the sign-in page, the session opens the dashboard and the recorder's OpenAPI page (which
renders from the recorder's own assets only), and signing out ends it."""

from __future__ import annotations

import threading

import pytest

from tests.support import wait_for
from tests.test_auth_web import PASSWORDS, site  # noqa: F401  (the servers)
from tests.test_dashboard_browser import browser  # noqa: F401  (headless chromium)

pytestmark = pytest.mark.slow

RESOURCES = "return performance.getEntriesByType('resource').map((e) => e.name);"


@pytest.mark.timeout(60)
def test_the_browser_signs_in_opens_both_servers_and_signs_out(site, browser):  # noqa: F811
    from selenium.webdriver.common.by import By

    viewer, recorder = site["viewer"], site["recorder"]
    done = threading.Event()

    def live():  # new pictures, as a running pipeline sends them (the page loads on the first)
        seq = 1
        while not done.wait(0.1):
            seq += 1
            for stream in ("a", "b"):
                site["hub"].publish(stream, site["jpeg"], seq=seq, results=[], model="m")

    threading.Thread(target=live, daemon=True).start()
    try:
        signs_in_and_out(browser, viewer, recorder, By)
    finally:
        done.set()


def signs_in_and_out(driver, viewer: str, recorder: str, By) -> None:
    driver.get(viewer + "/")
    assert driver.current_url.startswith(viewer + "/login")
    driver.find_element(By.NAME, "username").send_keys("alice")
    driver.find_element(By.NAME, "password").send_keys(PASSWORDS["alice"])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(lambda: driver.current_url == viewer + "/", 10, what="the dashboard after signing in")
    streams = [
        s.get_attribute("data-stream") for s in driver.find_elements(By.CSS_SELECTOR, "section.stream")
    ]
    assert streams == ["a"]  # alice may see stream a only
    assert "alice" in driver.find_element(By.CSS_SELECTOR, "form.account").text

    # the same session opens the recorder's OpenAPI page, drawn from the recorder's own assets
    driver.get(recorder + "/docs")
    wait_for(
        lambda: driver.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title"),
        20,
        what="Swagger UI to render",
    )
    loaded = driver.execute_script(RESOURCES)
    assert loaded and all(url.startswith(recorder + "/") for url in loaded), loaded

    driver.get(viewer + "/")
    driver.find_element(By.CSS_SELECTOR, "form.account button").click()
    wait_for(lambda: "/login" in driver.current_url, 10, what="the sign-in page after signing out")
    driver.get(viewer + "/")
    assert driver.current_url.startswith(viewer + "/login")
