"""The viewer in a real browser: Debian's chromium driven by selenium through the system
chromedriver (`make test-browser` installs both; selenium never downloads a browser here).

Pages must load without console errors, draw their curves, follow links from a problem to its
trajectories, keep injected markup inert and refresh while a run trains.

Screenshots for the docs: `SPO_SCREENSHOTS_DIR=docs/img .venv/bin/python -m pytest -m browser
tests/test_view_browser.py -k screenshots` writes them (a 40-step fake run).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from view_fixtures import make_eval_dir, make_run

from spo_agents.view import ViewServer

pytestmark = pytest.mark.browser


def _driver(width: int = 1400, height: int = 1000):
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        pytest.skip(
            "chromium / chromedriver not found: `make test-browser` installs Debian's `chromium` and "
            "`chromium-driver` when run as root (apt-get); without them the browser test cannot run"
        )
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not fetch drivers or browsers
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed: `pip install -e '.[dev]'`")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    driver = _driver()  # first: without a browser the test is skipped before building anything
    root = tmp_path_factory.mktemp("browser")
    runs = [
        make_run(root, "run-a", steps=12, batch=8, num_problems=60, k=2, inject=True),
        make_run(root, "run-b", steps=8, batch=8, num_problems=60, k=2, seed=1, checkpoint=False),
        make_eval_dir(root, k=4, inject=True),
    ]
    server = ViewServer(runs, port=0, refresh_s=1).start()
    yield server, driver, runs
    driver.quit()
    server.stop()


def _errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


PAGES = [
    "",
    "r/0",
    "r/0/problems",
    "r/0/problems?sort=v_hat&desc=0&visited=1",
    "r/0/trajectories",
    "r/0/traj?step=12&index=0",
    "r/0/traj?step=12&index=0&lp=1",
    "r/0/evals",
    "r/0/eval/step-000012",
    "e/2",
    "compare",
    "r/1",
    "r/1/problems",
]


def test_pages_load_without_console_errors(site):
    server, driver, _ = site
    for page in PAGES:
        driver.get(server.url + page)
        assert driver.find_element("css selector", "main h1").text, page
        assert _errors(driver) == [], page


def test_curves_are_drawn(site):
    server, driver, _ = site
    driver.get(server.url + "r/0")
    paths = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart path.series')).map(p => "
        "[p.dataset.label, (p.getAttribute('d').match(/[ML]/g) || []).length, p.getBBox().width])"
    )
    drawn = {label: (points, width) for label, points, width in paths}
    assert drawn["train/reward_mean"][0] == 12 and drawn["train/reward_mean"][1] > 200
    assert drawn["eval/avg_at_k"][0] == 4
    assert len(paths) >= 20
    driver.get(server.url + "compare")
    labels = driver.execute_script(
        "return Array.from(document.querySelectorAll('#chart-train-reward-mean path.series')).map(p => p.dataset.label)"
    )
    assert labels == ["run-a", "run-b"]


def test_clicking_a_problem_opens_its_trajectories(site):
    server, driver, _ = site
    driver.get(server.url + "r/0/problems?sort=last_step&desc=1")
    link = driver.find_element("css selector", "table.data tbody tr td a")
    problem = link.text
    link.click()
    assert driver.find_element("css selector", "main h1").text == problem
    driver.find_element("css selector", "a.traj-link").click()
    assert driver.find_element("css selector", "main h1").text.startswith("Step ")
    assert driver.find_element("css selector", ".fact a.mono").text == problem
    turns = driver.find_elements("css selector", ".convo > .turn")
    assert [t.get_attribute("class") for t in turns] == ["turn model", "turn env", "turn model"]
    assert driver.find_element("css selector", ".turn.model pre.code").text.startswith("print(")
    assert _errors(driver) == []


def test_injected_markup_stays_text(site):
    server, driver, _ = site
    for page in ("r/0/traj?step=12&index=0", "r/0/traj?step=12&index=0&lp=1"):
        driver.get(server.url + page)
        assert driver.execute_script("return window.__pwned") is None
        assert "<script>window.__pwned = 1</script>" in driver.find_element("css selector", ".convo").text
    driver.get(server.url + "e/2")
    driver.find_element("css selector", "table.data tbody tr td a").click()
    driver.find_element("css selector", "a.traj-link").click()
    assert driver.execute_script("return window.__pwned") is None
    assert _errors(driver) == []


def test_overview_refreshes_while_the_run_trains(site):
    server, driver, runs = site
    driver.get(server.url + "r/0")
    count = (
        "return (document.querySelector('#chart-training-reward path.series')"
        ".getAttribute('d').match(/[ML]/g) || []).length"
    )
    assert driver.execute_script(count) == 12
    with open(runs[0] / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 13, "train/reward_mean": 0.5, "train/accuracy": 0.5}) + "\n")
    deadline = time.time() + 10
    while time.time() < deadline and driver.execute_script(count) != 13:
        time.sleep(0.2)
    assert driver.execute_script(count) == 13
    assert _errors(driver) == []


def test_screenshots(tmp_path):
    out = os.environ.get("SPO_SCREENSHOTS_DIR")
    if not out:
        pytest.skip("set SPO_SCREENSHOTS_DIR=docs/img to write the documentation's screenshots")
    a = make_run(tmp_path, "math-python-v0-spo", steps=40)
    b = make_run(tmp_path, "math-python-v0-spo-seed1", steps=40, seed=1, learn_rate=0.07, checkpoint=False)
    e = make_eval_dir(tmp_path, "eval-smollm2-k8")
    old = time.time() - 3600  # not "training": no refresh badge in the pictures
    for p in (a, b):
        os.utime(p / "metrics.jsonl", (old, old))
    server = ViewServer([a, b, e], port=0).start()
    driver = _driver(1400, 900)
    shots = {
        "overview": ("r/0", 1180),
        "problems": ("r/0/problems?sort=visits&desc=1", 900),
        "problem": (None, 900),
        "trajectory": ("r/0/traj?step=39&index=2", 840),
        "logprobs": ("r/0/traj?step=39&index=3&lp=1", 840),
        "eval": ("e/2", 900),
        "compare": ("compare", 1180),
    }
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        for name, (page, height) in shots.items():
            if page is None:  # the busiest problem's history
                driver.get(server.url + "r/0/problems?sort=visits&desc=1")
                driver.find_element("css selector", "table.data tbody tr td a").click()
            else:
                driver.get(server.url + page)
            driver.set_window_size(1400, height)
            time.sleep(0.2)
            assert _errors(driver) == [], name
            driver.save_screenshot(str(Path(out) / f"view-{name}.png"))
    finally:
        driver.quit()
        server.stop()
