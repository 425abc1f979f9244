"""The playground page (GET /) in headless Chromium: pick a class by name, Generate, see the image.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped without them.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from tests.service_harness import make_tiny_bundle, start_service

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium is not installed: apt-get install -y chromium chromium-driver")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    bundle = make_tiny_bundle(tmp_path_factory.mktemp("bundle"))
    sp = start_service("all", {"LDIT_MODEL_DIR": str(bundle)})
    yield sp
    sp.stop()


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ldit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_playground_generates_an_image(service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(service.url + "/")
    # class names and presets come from GET /v1/model
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#classes option")) == 10)
    names = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#classes option")]
    assert names[3] == "digit-3"
    presets = Select(browser.find_element(By.ID, "preset"))
    assert presets.first_selected_option.get_attribute("value") == "quick"
    assert {o.get_attribute("value") for o in presets.options} >= {"quick", "nocfg", "long"}

    cls, seed = browser.find_element(By.ID, "class"), browser.find_element(By.ID, "seed")
    cls.clear()
    cls.send_keys("digit-3")
    seed.clear()
    seed.send_keys("11")
    presets.select_by_value("nocfg")
    curl = browser.find_element(By.ID, "curl").text
    assert '"class_label":"digit-3"' in curl and '"seed":11' in curl and '"preset":"nocfg"' in curl
    assert curl.startswith(f"curl -sS -X POST '{service.url}/generate'")

    browser.find_element(By.ID, "generate").click()
    img = browser.find_element(By.ID, "image")
    wait.until(lambda d: (img.get_attribute("src") or "").startswith("blob:") and d.execute_script(
        "const i = arguments[0]; return i.complete && i.naturalWidth > 0;", img))
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [32, 32]
    headers = browser.find_element(By.ID, "headers").text
    assert "HTTP 200" in headers and "x-seed 11" in headers and "x-model-version" in headers
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # an unknown class name: the JSON error is shown, with the suggestions
    cls.clear()
    cls.send_keys("digit-33")
    browser.find_element(By.ID, "generate").click()
    err = browser.find_element(By.ID, "error")
    wait.until(lambda d: err.is_displayed())
    assert "422 invalid_request" in err.text and "class_label" in err.text and "digit-3" in err.text
    assert not img.is_displayed()
    browser.save_screenshot(str(tmp_path / "playground-error.png"))


def test_progress_bar_follows_the_job_events(service, browser, tmp_path):
    """Generate with a long preset: the bar moves through intermediate steps, then the image shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 90)
    browser.get(service.url + "/")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#preset option")) > 0)
    Select(browser.find_element(By.ID, "preset")).select_by_value("long")  # 200 points: 199 steps
    seed = browser.find_element(By.ID, "seed")
    seed.clear()
    seed.send_keys("4321")
    browser.find_element(By.ID, "generate").click()
    bar = browser.find_element(By.ID, "progress")
    wait.until(lambda d: 0 < int(float(bar.get_attribute("value"))) < 199)  # caught mid-flight
    browser.save_screenshot(str(tmp_path / "progress.png"))
    img = browser.find_element(By.ID, "image")
    wait.until(lambda d: img.is_displayed() and d.execute_script("return arguments[0].naturalWidth", img) == 32)
    seen = [int(float(v)) for v in bar.get_attribute("data-seen").split(",") if v]
    middle = [v for v in seen if 0 < v < 199]
    assert middle and middle == sorted(middle), seen
    assert bar.get_attribute("max") == "199" and bar.get_attribute("value") == "199"
    assert browser.find_element(By.ID, "status").text.startswith("done in")
    assert "x-seed 4321" in browser.find_element(By.ID, "headers").text


def test_swagger_ui_renders_without_a_network(service, browser, tmp_path):
    """/docs draws the operations from local assets (this machine reaches no CDN)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(service.url + "/docs")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/generate", "/jobs", "/v1/model"} <= paths
    scripts = browser.execute_script("return [...document.scripts].map((s) => s.src).filter(Boolean)")
    assert scripts and all(s.startswith(service.url + "/") for s in scripts)
    browser.save_screenshot(str(tmp_path / "docs.png"))
