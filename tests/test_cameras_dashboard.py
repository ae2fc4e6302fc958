"""The dashboard's camera registry section (cameras.js) in headless Chromium against a real API server."""

from __future__ import annotations

import time
import uuid

from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec

from pipeline.cameras.health import HealthStore
from pipeline.cameras.leases import LeaseManager
from pipeline.cameras.registry import CameraRegistry
from pipeline.redis_store import connect
from tests.test_api import ApiServer
from tests.test_dashboard import browser, console_errors, open_dashboard, server, wait  # noqa: F401 (fixtures)


def row_selector(cid: str) -> str:
    return f'#camera-registry-table tr[data-camera-id="{cid}"]'


def click_row_button(driver: WebDriver, cid: str, index: int, what: str) -> None:
    """Click a button of a camera's row; the table re-renders as health comes in, so a button found
    just before can be gone: find it again until the click lands."""

    def attempt(d: WebDriver) -> bool:
        try:
            d.find_elements(By.CSS_SELECTOR, f"{row_selector(cid)} button")[index].click()
        except (StaleElementReferenceException, IndexError):
            return False
        return True

    wait(driver, attempt, what)


def test_cameras_added_changed_removed_and_health_shown(browser: WebDriver, server: ApiServer) -> None:  # noqa: F811
    open_dashboard(browser, server)
    client = connect(server.settings.redis)
    prefix = server.settings.redis.key_prefix
    registry = CameraRegistry(client, prefix)
    cid = f"dash-{uuid.uuid4().hex[:6]}"
    try:
        form = wait(browser, ec.presence_of_element_located((By.ID, "camera-form")), "the camera form")
        form.find_element(By.NAME, "id").send_keys(cid)
        form.find_element(By.NAME, "product_class").send_keys("bolt")
        form.find_element(By.NAME, "source").send_keys("rtsp://op:pw@10.1.2.3/s")
        form.find_element(By.NAME, "fps").send_keys("4")
        form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        row = wait(browser, ec.presence_of_element_located((By.CSS_SELECTOR, row_selector(cid))), "the new row")
        assert registry.get(cid).fps == 4.0 and registry.get(cid).source == "rtsp://op:pw@10.1.2.3/s"
        assert "rtsp://***@10.1.2.3/s" in row.text and "unassigned" in row.text

        # Health as a capture worker reports it: the row turns live with its frames/s.
        lease = LeaseManager(client, prefix, "worker-x", 30.0).acquire(cid)
        assert lease is not None
        HealthStore(client, prefix).put({"camera_id": cid, "state": "live", "fps": 4.2, "last_frame_ts": time.time(),
                                         "reconnects": 3, "worker": "worker-x", "lease_token": lease.token,
                                         "updated_at": time.time()})
        wait(browser, lambda d: "live" in d.find_element(By.CSS_SELECTOR, row_selector(cid)).text, "state live")
        text = browser.find_element(By.CSS_SELECTOR, row_selector(cid)).text
        assert "4.2" in text and "worker-x" in text

        # Change the frame rate only: the masked source shown is not sent back.
        click_row_button(browser, cid, 0, "the row's edit button")
        fps = browser.find_element(By.CSS_SELECTOR, "#camera-form [name=fps]")
        fps.clear()
        fps.send_keys("9")
        browser.find_element(By.CSS_SELECTOR, "#camera-form button[type=submit]").click()
        wait(browser, lambda d: registry.get(cid).fps == 9.0, "the changed frame rate in the registry")
        assert registry.get(cid).source == "rtsp://op:pw@10.1.2.3/s"

        click_row_button(browser, cid, 1, "the row's remove button")
        browser.switch_to.alert.accept()
        wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, row_selector(cid)), "the row to go")
        assert cid not in registry.all()
        assert console_errors(browser) == []
    finally:
        client.close()
