"""The web chat page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven with
selenium): load the page from a real minilm-serve, send a message, watch the streamed tokens grow the DOM,
check the text against generate(), start over. Writes a screenshot (``$MINILM_WEBCHAT_PNG``, default
/tmp/webchat.png)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest
import torch
from servekit import Server, kit  # noqa: F401  (kit is a fixture)

from minilm.chat import instruction_marker
from minilm.config import SampleConfig
from minilm.sampling import generate

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not CHROMIUM.exists() or not Path(DRIVER).exists(),
                                reason="needs Debian's chromium and chromium-driver "
                                       "(apt-get install -y chromium chromium-driver)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[test]')")

# every childList mutation of an answer's text: its length then, and when the observer saw it
OBSERVE = """
window.__growth = [];
new MutationObserver((records) => {
  const t = performance.now();
  for (const r of records) {
    const el = r.target.closest && r.target.closest('.assistant .text');
    if (el && r.addedNodes.length) window.__growth.push([r.addedNodes[0].textContent.length, t]);
  }
}).observe(document.getElementById('messages'), {childList: true, subtree: true});
"""


@pytest.fixture(scope="module")
def server(kit, tmp_path_factory):  # noqa: F811
    srv = Server(kit, log=tmp_path_factory.mktemp("web") / "server.log")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,720", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def set_control(driver, name: str, value) -> None:
    driver.execute_script("const el = document.getElementById(arguments[0]); el.value = arguments[1];"
                          "el.dispatchEvent(new Event('input'));", name, str(value))


def test_page_streams_an_answer_and_starts_over(server, browser, kit):  # noqa: F811
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait(browser, lambda d: "minilm" in d.find_element(By.ID, "status").text)
    assert "context 128 tokens" in browser.find_element(By.ID, "status").text
    browser.execute_script(OBSERVE)
    set_control(browser, "temperature", 0)
    set_control(browser, "max_tokens", 60)
    question = "What is a list?"
    browser.find_element(By.ID, "input").send_keys(question)
    browser.find_element(By.ID, "send").click()
    done = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-state='done']"))
    text = done[0].find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")

    torch.set_num_threads(1)
    cfg = dataclasses.replace(SampleConfig(temperature=0.0, min_new_tokens=0, max_new_tokens=60),
                              stop=[instruction_marker(kit.template)])
    assert text == generate(kit.model, kit.tokenizer, [kit.template.format(instruction=question)], cfg)[0]
    growth = browser.execute_script("return window.__growth")
    lengths = [n for n, _ in growth]
    assert len(lengths) >= 3 and lengths == sorted(lengths) and lengths[-1] == len(text), growth
    assert len({t for _, t in growth}) >= 2, growth          # the text grew at different moments
    assert int(done[0].get_attribute("data-chunks")) >= 3
    assert browser.find_element(By.CSS_SELECTOR, ".user").text == question

    browser.find_element(By.ID, "input").send_keys("How do I open a file?")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant[data-state='done']")) == 2)
    png = Path(os.environ.get("MINILM_WEBCHAT_PNG", "/tmp/webchat.png"))
    assert browser.save_screenshot(str(png)) and png.stat().st_size > 10_000

    browser.find_element(By.ID, "reset").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .msg") == []
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_page_shows_a_server_error_and_keeps_working(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/")
    wait(browser, lambda d: "minilm" in d.find_element(By.ID, "status").text)
    set_control(browser, "max_tokens", 100000)          # above the server's max_tokens limit
    browser.find_element(By.ID, "input").send_keys("What is a dict?")
    browser.find_element(By.ID, "send").click()
    err = wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))
    assert "max_tokens must be in 1..512" in err[0].text
    set_control(browser, "max_tokens", 20)
    browser.find_element(By.ID, "input").send_keys("What is a dict?")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-state='done']"))
