"""The line dashboard in headless Chromium against a real API server, broker and Redis: camera
state and score timeline, editing a camera's threshold and ignore regions, and the event view
(full-resolution frame, raw/heat/mask switch, legend, random-weights warning, label buttons)."""

from __future__ import annotations

import time
import uuid

import numpy as np
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec

from pipeline.imaging import quantize_map
from pipeline.redis_store import connect
from pipeline.references.store import ReferenceStore
from schemas.scores import Provenance
from tests import test_dashboard as dash
from tests.test_api import HEIGHT, WIDTH, make_event, make_score, publish, publish_events
from tests.test_api_learning import RANDOM_FP, publish_frame

browser = dash.browser
server = dash.server


def test_camera_tile_timeline_and_tuning(browser: object, server: dash.ApiServer) -> None:
    driver = browser
    dash.open_dashboard(driver, server)  # type: ignore[arg-type]
    camera = f"cam-{uuid.uuid4().hex[:6]}"
    publish(server.settings.kafka, "scores", [(camera, make_score(camera, seq=s).model_dump_json().encode())
                                             for s in (1, 2, 3)])
    tile = dash.wait(driver, ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#camera-grid [data-camera-id="{camera}"]')), "the camera tile")
    assert isinstance(tile, WebElement)
    dash.wait(driver, lambda d: tile.get_attribute("data-state") == "live", "the live state")
    timeline = tile.find_element(By.CSS_SELECTOR, "svg.timeline")
    dash.wait(driver, lambda d: timeline.get_attribute("data-points") not in (None, "", "0"), "the timeline")
    assert timeline.find_elements(By.CSS_SELECTOR, "line.threshold")
    assert timeline.get_attribute("data-threshold") == "0.5"

    tile.click()
    view = dash.wait(driver, ec.visibility_of_element_located((By.ID, "camera-view")), "the camera view")
    assert isinstance(view, WebElement)
    frame = view.find_element(By.CSS_SELECTOR, "img.frame")
    dash.wait(driver, lambda d: dash.loaded(d, frame), "the camera frame")
    dash.wait(driver, lambda d: view.get_attribute("data-threshold") == "0.5", "the threshold in effect")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", frame)
    w, h = frame.size["width"], frame.size["height"]
    for dx, dy in ((-0.4, -0.4), (0.0, -0.4), (0.0, 0.0)):  # offsets from the centre
        ActionChains(driver).move_to_element_with_offset(frame, int(dx * w), int(dy * h)).click().perform()
    info = view.find_element(By.CSS_SELECTOR, ".regions-info")
    assert "drawing: 3 point(s)" in info.text, info.text
    view.find_element(By.CSS_SELECTOR, "button.close-polygon").click()
    assert view.get_attribute("data-regions") == "1"
    view.find_element(By.CSS_SELECTOR, "button.save-regions").click()
    dash.wait(driver, lambda d: view.get_attribute("data-saved") == "regions", "the regions saved")
    field = view.find_element(By.CSS_SELECTOR, "#threshold-form input[name=threshold]")
    field.clear()
    field.send_keys("0.7")
    view.find_element(By.CSS_SELECTOR, "#threshold-form button[type=submit]").click()
    dash.wait(driver, lambda d: view.get_attribute("data-threshold") == "0.7", "the new threshold")
    tuning = server.http.get(f"/api/v1/cameras/{camera}/tuning").json()
    assert tuning["effective_threshold"] == 0.7 and len(tuning["ignore_regions"]) == 1
    (x0, y0), (x1, _), (_, y2) = tuning["ignore_regions"][0]
    assert 0.05 < x0 < 0.15 and 0.05 < y0 < 0.15 and 0.45 < x1 < 0.55 and 0.45 < y2 < 0.55
    # The timeline's threshold line follows the camera's threshold with the next frame.
    publish(server.settings.kafka, "scores", [(camera, make_score(camera, seq=4).model_dump_json().encode())])
    dash.wait(driver, lambda d: timeline.get_attribute("data-threshold") == "0.7", "the timeline threshold")
    assert dash.console_errors(driver) == []  # type: ignore[arg-type]


def test_event_view_modes_legend_and_false_alarm(browser: object, server: dash.ApiServer) -> None:
    driver = browser
    dash.open_dashboard(driver, server)  # type: ignore[arg-type]
    driver.find_element(By.ID, "operator").send_keys("shift-lead\n")
    camera = f"cam-{uuid.uuid4().hex[:6]}"
    image = np.full((HEIGHT, WIDTH, 3), 80, np.uint8)
    event = make_event(camera, first_seq=2, ts=time.time())
    amap = np.full((16, 16), 0.1, np.float32)
    amap[:8, :8] = 0.9
    event.peak_map_png, event.peak_map_min, event.peak_map_max = quantize_map(amap, 16)
    event.peak_source = publish_frame(server, camera, event.peak_seq, image)
    event.provenance = Provenance(method="winclip", model_fingerprint=RANDOM_FP, prompt_version="p",
                                  reference_version=None)
    publish_events(server.settings.kafka, [event])
    item = dash.wait(driver, ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#events li[data-event-id="{event.event_id}"]')), "the event in the feed")
    assert isinstance(item, WebElement)
    item.click()
    view = dash.wait(driver, ec.visibility_of_element_located((By.ID, "event-view")), "the event view")
    assert isinstance(view, WebElement)
    overlay = view.find_element(By.CSS_SELECTOR, "img.overlay")
    dash.wait(driver, lambda d: dash.loaded(d, overlay), "the mask view")
    assert view.find_element(By.CSS_SELECTOR, ".random-warning").is_displayed()
    assert "peak 0.900 vs threshold 0.500" in view.text and "not labelled" in view.text
    assert f"{event.n_frames} (#{event.first_seq}–#{event.last_seq}, peak #{event.peak_seq})" in view.text
    # Full resolution: the frame from the frames topic, not the half-size thumbnail.
    assert driver.execute_script("return arguments[0].naturalWidth", overlay) == WIDTH
    assert not view.find_element(By.CSS_SELECTOR, ".legend").is_displayed()
    first_src = overlay.get_attribute("src")
    view.find_element(By.CSS_SELECTOR, '.modes button[data-mode="heat"]').click()
    dash.wait(driver, lambda d: overlay.get_attribute("src") != first_src and dash.loaded(d, overlay), "the heat view")
    assert view.find_element(By.CSS_SELECTOR, ".legend").is_displayed()
    assert view.get_attribute("data-mode") == "heat"

    view.find_element(By.CSS_SELECTOR, ".label-note").send_keys("reflection on the fixture")
    view.find_element(By.CSS_SELECTOR, "button.label-false").click()
    dash.wait(driver, lambda d: view.get_attribute("data-label") == "false_alarm", "the false-alarm label")
    message = view.find_element(By.CSS_SELECTOR, ".label-message").text
    assert "joined ball_screw:v" in message, message
    stored = server.http.get(f"/api/v1/events/{event.event_id}").json()["label"]
    assert stored["by"] == "shift-lead" and stored["note"] == "reflection on the fixture"
    client = connect(server.settings.redis)
    try:
        assert ReferenceStore(client, server.settings.redis.key_prefix).current("ball_screw") is not None
    finally:
        client.close()
    row = dash.wait(driver, ec.presence_of_element_located(
        (By.CSS_SELECTOR, f'#shift-table tr[data-camera-id="{camera}"]')), "the shift row")
    assert isinstance(row, WebElement)
    dash.wait(driver, lambda d: row.find_element(By.CSS_SELECTOR, ".rate").text == "100 %", "the false-alarm rate")
    assert dash.console_errors(driver) == []  # type: ignore[arg-type]
