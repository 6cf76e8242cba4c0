"""The server's web page in a real browser: Debian's headless Chromium (scripts/setup.sh installs
it) driven by Selenium against `dyvte-rt serve` on the demo bundle, asserting what a person sees:
the streamed answer, the exit layer and the router chart, a conversation and its reset, an error
for a bad image, the API key prompt; and that the page asks nothing of any other host."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.dyvte_rt.served import IMAGE, start_server

QUESTION = "what color is the shape in the top left?"
WAIT = 60  # seconds for an answer on 2 busy cores


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.fail("chromium and chromium-driver are needed: bash scripts/setup.sh installs them (apt)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _browser()
    yield driver
    driver.quit()


def _serve(bundle: Path, *options: str):
    process, url = start_server(bundle, "--max-batch", "2", *options)
    return process, url


@pytest.fixture(scope="module")
def server(demo_bundle):
    process, url = _serve(demo_bundle)
    yield url
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def _wait(browser, condition, timeout: float = WAIT):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda _: condition())


def _by(browser, selector: str):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, selector)


def _ask(browser, question: str) -> None:
    box = _by(browser, "#question")[0]
    box.send_keys(question)
    _by(browser, "#ask")[0].click()


def _answered(browser, count: int):
    turns = _by(browser, ".turn.assistant")
    return len(turns) == count and turns[-1].find_elements("css selector", ".stats") and turns[-1]


def test_a_person_asks_about_an_image_and_sees_the_answer_and_where_the_image_left(
    browser, server, demo_bundle, tmp_path
):
    from dyvte_rt import DyvteModel

    with DyvteModel.load(demo_bundle) as model:  # what the page must show
        expected = model.ask(IMAGE, QUESTION, max_new_tokens=64, exit="router", threshold=0.35)
    browser.get(server + "/")
    _wait(browser, lambda: "demo" in _by(browser, "#model-name")[0].text or None)
    assert "batch slots 0/2" in _wait(browser, lambda: _by(browser, "#server-state")[0].text or None, 10)
    _by(browser, "#image-file")[0].send_keys(str(IMAGE))
    _wait(browser, lambda: _by(browser, "#preview")[0].get_attribute("src").startswith("data:image/png"))
    from selenium.webdriver.support.ui import Select

    Select(_by(browser, "#exit-policy")[0]).select_by_value("router")
    browser.execute_script(
        "const t = document.getElementById('threshold');t.value = '0.35'; t.dispatchEvent(new Event('input'))"
    )
    assert _by(browser, "#threshold-value")[0].text == "0.35"
    _ask(browser, QUESTION)
    turn = _wait(browser, lambda: _answered(browser, 1))
    assert turn.find_element("css selector", ".answer").text == expected.text.strip()
    exit_text = turn.find_element("css selector", "[data-stat=exit-layer] b").text
    assert exit_text == f"after layer {expected.exit_layer}"
    saved = 1 - expected.prefill_macs["actual"] / expected.prefill_macs["full"]
    assert turn.find_element("css selector", "[data-stat=macs-saved] b").text == f"{100 * saved:.1f}%"
    kept = turn.find_element("css selector", "[data-stat=visual-kept] b").text
    assert kept == f"{expected.visual_tokens_kept} of {expected.visual_tokens}"
    bars = turn.find_elements("css selector", "svg.chart rect")  # one bar per router asked
    assert [int(b.get_attribute("data-layer")) for b in bars] == sorted(expected.exit_probs)
    for bar in bars:
        assert float(bar.get_attribute("data-p")) == pytest.approx(
            expected.exit_probs[int(bar.get_attribute("data-layer"))], abs=1e-4
        )
        assert float(bar.get_attribute("height")) > 0
    line = turn.find_element("css selector", "svg.chart line.threshold")  # drawn at the threshold asked
    assert float(line.get_attribute("y1")) == pytest.approx(88 - 0.35 * 80)
    browser.save_screenshot(str(tmp_path / "web-page.png"))
    assert (tmp_path / "web-page.png").stat().st_size > 10_000

    _ask(browser, "what shape is in the top right?")  # the conversation goes on
    _wait(browser, lambda: _answered(browser, 2))
    assert len(_by(browser, ".turn.user")) == 2
    _ask(browser, "/reset")
    _wait(browser, lambda: not _by(browser, ".turn"))
    hosts = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)"
    )
    assert set(hosts) == {server}, hosts  # every asset and call went to the server alone


def test_a_bad_image_shows_the_server_s_error_and_the_page_stays_usable(browser, server, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text, not a PNG" * 20)
    browser.get(server + "/")
    _wait(browser, lambda: _by(browser, "#model-name")[0].text or None)
    _by(browser, "#image-file")[0].send_keys(str(bad))
    _wait(browser, lambda: _by(browser, "#preview")[0].get_attribute("src").startswith("data:"))
    _ask(browser, QUESTION)
    error = _wait(browser, lambda: _by(browser, "#error")[0].is_displayed() and _by(browser, "#error")[0])
    assert "image" in error.text and "Traceback" not in error.text
    assert not _by(browser, ".turn")  # the failed question is not left in the conversation
    _by(browser, "#image-file")[0].send_keys(str(IMAGE))
    _wait(browser, lambda: not _by(browser, "#error")[0].is_displayed())
    _ask(browser, QUESTION)
    assert _wait(browser, lambda: _answered(browser, 1)).find_element("css selector", ".answer").text


def test_behind_an_api_key_the_page_asks_for_it(browser, demo_bundle):
    process, url = _serve(demo_bundle, "--api-key", "page-key")
    try:
        browser.get(url + "/")
        error = _wait(browser, lambda: _by(browser, "#error")[0].is_displayed() and _by(browser, "#error")[0])
        assert "API key" in error.text and _by(browser, "#key-row")[0].is_displayed()
        field = _by(browser, "#api-key")[0]
        field.send_keys("page-key")
        browser.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        _wait(browser, lambda: "demo" in _by(browser, "#model-name")[0].text or None)
        assert not _by(browser, "#error")[0].is_displayed()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
