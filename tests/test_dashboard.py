"""The dashboard in headless Chromium (Debian's chromium + chromedriver) against a real API server.

Replay events are shown in the live feed (labelled "replay <session>"): a replay is how alert
rules are tried out, so the feed must show what it produces. The test publishes a replayed event
only after the page's event stream is open and the page never polls for events, so the event can
only arrive through the stream (SSE).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.config import ApiSettings, KafkaSettings, RedisSettings, Settings
from pipeline.embedded import free_port
from tests.test_api import ApiServer, make_event, make_score, publish, publish_events, running_api

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
TOKEN = "dashboard-token-0123456789"
WAIT_S = 30


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        pytest.fail(f"the dashboard test needs Debian's chromium and chromedriver; missing: {', '.join(missing)}. "
                    "Install them with `make setup` (as root) or "
                    "`apt-get install -y --no-install-recommends chromium chromium-driver`.", pytrace=False)
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager would try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(broker: str, redis_server: str) -> Iterator[ApiServer]:
    prefix = f"t-dash-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix, partitions=2, request_timeout_ms=10_000),
        redis=RedisSettings(url=redis_server, key_prefix=prefix),
        api=ApiSettings(host="127.0.0.1", port=free_port(), token=TOKEN, group_id=f"{prefix}-api"),
    )
    with running_api(settings) as api:
        yield api


def wait(driver: WebDriver, condition: object, what: str) -> object:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)  # type: ignore[arg-type]
    except TimeoutException:
        logs = "\n".join(str(e) for e in driver.get_log("browser"))
        raise AssertionError(f"dashboard: {what} not seen within {WAIT_S}s; browser console:\n{logs}") from None


def loaded(driver: WebDriver, img: WebElement) -> bool:
    return bool(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img))


def open_dashboard(driver: WebDriver, server: ApiServer) -> None:
    driver.get(f"{server.url}/?token={TOKEN}")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-stream") == "open",
         "the event stream to open")


def console_errors(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_replayed_event_appears_live_and_opens(browser: WebDriver, server: ApiServer) -> None:
    open_dashboard(browser, server)
    assert "token" not in browser.current_url  # taken from the address bar into localStorage
    session = f"replay-{uuid.uuid4().hex[:6]}"
    event = make_event("press-7", first_seq=3, ts=time.time(), session=session)
    selector = f'#events li[data-event-id="{event.event_id}"]'
    assert not browser.find_elements(By.CSS_SELECTOR, selector)

    publish_events(server.settings.kafka, [event])
    item = wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, selector)), "the replayed event in the feed")
    assert isinstance(item, WebElement)
    assert browser.find_element(By.CSS_SELECTOR, "#events li").get_attribute("data-event-id") == event.event_id
    # One stream connection all along, so the event was not fetched by a reconnect's reload.
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-stream-opens") == "1"
    assert item.get_attribute("data-replay-session") == session and "replay" in item.get_attribute("class")
    assert f"replay {session}" in item.text and "press-7" in item.text and "0.900" in item.text
    wait(browser, lambda d: loaded(d, item.find_element(By.CSS_SELECTOR, "img.thumb")), "the event thumbnail")

    item.click()
    view = wait(browser, ec.visibility_of_element_located((By.ID, "event-view")), "the event view")
    assert isinstance(view, WebElement)
    wait(browser, lambda d: view.find_element(By.CSS_SELECTOR, ".event-id").text == event.event_id, "the event id")
    overlay = view.find_element(By.CSS_SELECTOR, "img.overlay")
    wait(browser, lambda d: loaded(d, overlay), "the overlay image")
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == event.width // 2  # the thumbnail's
    assert overlay.get_attribute("src").startswith("blob:")  # fetched with the header, no token in the URL
    assert f"replay {session}" in view.text and "open" in view.text
    assert len(view.find_elements(By.CSS_SELECTOR, "table.regions tbody tr")) == len(event.regions)

    # The close arrives on the stream too and updates both the feed item and the open view.
    publish_events(server.settings.kafka, [event.model_copy(update={"status": "closed"})])
    wait(browser, lambda d: item.get_attribute("data-status") == "closed", "the event closing in the feed")
    wait(browser, lambda d: view.get_attribute("data-status") == "closed", "the event view updating")
    assert console_errors(browser) == []


def test_camera_grid_shows_the_latest_frame(browser: WebDriver, server: ApiServer) -> None:
    open_dashboard(browser, server)
    camera = f"cam-{uuid.uuid4().hex[:6]}"
    publish(server.settings.kafka, "scores", [(camera, make_score(camera, seq=5).model_dump_json().encode())])
    tile = wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, f'#camera-grid [data-camera-id="{camera}"]')),
                "the camera tile")
    assert isinstance(tile, WebElement)
    wait(browser, lambda d: loaded(d, tile.find_element(By.CSS_SELECTOR, "img.latest")), "the camera frame")
    assert browser.execute_script("return arguments[0].naturalWidth", tile.find_element(By.CSS_SELECTOR, "img")) == 40
    assert camera in tile.text and "0.930" in tile.text
    assert console_errors(browser) == []


def test_token_form_when_no_or_a_wrong_token(browser: WebDriver, server: ApiServer) -> None:
    browser.get(f"{server.url}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{server.url}/")
    form = wait(browser, ec.visibility_of_element_located((By.ID, "token-form")), "the token form")
    assert isinstance(form, WebElement)
    field = browser.find_element(By.ID, "token-input")
    field.send_keys("wrong-token")
    field.submit()
    wait(browser, lambda d: "rejected" in d.find_element(By.ID, "token-message").text, "the rejection message")
    assert form.is_displayed()
    field.clear()
    field.send_keys(TOKEN)
    field.submit()
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-stream") == "open",
         "the stream with the right token")
    assert not form.is_displayed()
    assert browser.execute_script("return localStorage.getItem('linewatch.token')") == TOKEN


def test_a_real_replay_shows_up_live(browser: WebDriver, server: ApiServer, shared_data: Path,
                                     tmp_path: Path) -> None:
    """The whole way: `run_replay` -> frames topic -> scoring -> alerting -> API ingest -> SSE -> page."""
    import cv2

    from pipeline.config import AlertSettings
    from pipeline.imaging import encode_jpeg, read_image
    from pipeline.recording import Recorder
    from pipeline.replay.inputs import Labels, open_input
    from pipeline.replay.runner import run_replay
    from schemas.frames import FrameRef
    from tests.streaming_helpers import Background, site_settings, small_engine
    from workers.alert import run_alert
    from workers.score import run_score

    settings = site_settings(server.settings.kafka, server.settings.redis)
    # Zero threshold, k = n = 1: every frame is anomalous, so the replay opens an event for sure.
    settings.alert = AlertSettings(k=1, n=1, quiet_s=0.5, silence_s=1.0, default_threshold=0.0, min_region_area=0,
                                   group_id=settings.alert.group_id)
    camera = f"line-cam-{uuid.uuid4().hex[:6]}"
    with Recorder(tmp_path / "rec", camera) as rec:
        for seq, path in enumerate(sorted((shared_data / "test" / "pitting").glob("*.jpg"))[:2]):
            image = cv2.resize(read_image(str(path)), (160, 64))
            rec.write(encode_jpeg(image), FrameRef(camera_id=camera, line_id="line-1", product_class="ball_screw",
                                                   seq=seq, capture_ts=1_767_225_600.0 + seq, width=160, height=64))
    browser.get_log("browser")  # drop what earlier tests left (the token form test's deliberate 401s)
    open_dashboard(browser, server)
    with Background(run_score, settings, engine=small_engine()), Background(run_alert, settings):
        summary, _ = run_replay(settings, open_input(tmp_path / "rec", Labels()), "rec", tmp_path / "report",
                                speed=None, progress=False)
    assert summary.complete and summary.events >= 1, summary
    item = wait(browser, ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#events li[data-replay-session="{summary.session}"]')), "the replayed event in the feed")
    assert isinstance(item, WebElement) and camera in item.text
    item.click()
    view = wait(browser, ec.visibility_of_element_located((By.ID, "event-view")), "the event view")
    assert isinstance(view, WebElement)
    overlay = view.find_element(By.CSS_SELECTOR, "img.overlay")
    wait(browser, lambda d: loaded(d, overlay), "the overlay image")
    assert console_errors(browser) == []
