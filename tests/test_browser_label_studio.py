"""What a labeler sees in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
selenium) logged into a real Label Studio 1.23 whose project our backend (``taxomoco serve``) trained and
pre-annotated.

Checked in the Data Manager and the labeling view: the "taxomoco: label next" tab exists and is not the default tab,
its first rows are the head of ``GET /queue``, the *Prediction score* column shows the scores, and a task opened from
the tab shows the live version's pre-annotation. The selectors are those of Label Studio 1.23.2's pages. On failure
a screenshot and the page's HTML are saved in the test's tmp directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ml_backend.prelabel.order import LABEL_NEXT_TAB
from tests.servers import WARM_COLD_COLOURS, WARM_COLD_CONFIG, BackendServer, LabelStudioServer, wait_until
from tests.test_prelabel import _png, _result

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

AUTH = ("browser-test", "browser-pass-1234")
CHROMIUM_HINT = "apt-get install -y chromium chromium-driver   (or run `make test`, which does it)"
ROWS_CHECKED = 5


def _binary(env: str, *names: str) -> str:
    """``$env`` or the first of ``names`` on PATH; a missing browser fails with the install command (never a skip)."""
    found = os.environ.get(env) or next((shutil.which(n) for n in names if shutil.which(n)), None)
    if not found:
        pytest.fail(f"{' / '.join(names)} not found (or set {env}); install with: {CHROMIUM_HINT}")
    return found


@pytest.fixture(scope="module")
def project(label_studio: LabelStudioServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """21 images, 9 labelled (3 per leaf: past a cold start of 2 per leaf), trained and pre-annotated by the connected backend."""
    backend = BackendServer(tmp_path_factory.mktemp("browser-backend"), env={
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": label_studio.admin.token,
        "COLD_START_LABELS_PER_CLASS": "2"}, auth=AUTH)  # 3 labels per leaf: past the cold start
    backend.start()
    try:
        pid = label_studio.create_project(WARM_COLD_CONFIG, title="taxomoco in a browser")
        leaves = list(WARM_COLD_COLOURS)
        ids = label_studio.import_images(pid, {f"b{i:02d}.png": _png(WARM_COLD_COLOURS[leaves[i % 3]], seed=100 + i)
                                               for i in range(21)})
        for i, tid in enumerate(ids[:9]):
            label_studio.annotate(tid, _result(list(WARM_COLD_COLOURS)[i % 3]))
        label_studio.connect_backend(pid, backend.url, auth=AUTH)
        http = requests.Session()
        http.auth = AUTH
        assert http.post(f"{backend.url}/train", json={"project": pid}, timeout=10).status_code == 200
        status: dict = {}

        def prelabelled() -> bool:  # connecting started a job too (/setup): wait until both are over
            status.update(backend.job_status(pid))
            prelabel, success = status.get("prelabel") or {}, status.get("last_success") or {}
            idle = not status.get("queued") and not status.get("running")
            return idle and prelabel.get("state") == "done" and prelabel.get("version") == success.get("version")

        assert wait_until(prelabelled, 300, 2.0), f"{status}\n{backend.log()[-4000:]}"
        queue = http.get(f"{backend.url}/queue", params={"project": pid, "limit": 100}, timeout=10).json()
        yield {"pid": pid, "ids": ids, "version": status["prelabel"]["version"], "queue": queue}
    finally:
        backend.stop()


@pytest.fixture
def browser(label_studio: LabelStudioServer, tmp_path: Path) -> Iterator:
    """Headless Chromium logged into Label Studio as the suite's admin; a screenshot + HTML on failure."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = _binary("TAXOMOCO_TEST_CHROMIUM", "chromium", "chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    service = Service(executable_path=_binary("TAXOMOCO_TEST_CHROMEDRIVER", "chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.implicitly_wait(0)
    try:
        driver.get(f"{label_studio.url}/user/login/")
        driver.find_element(By.NAME, "email").send_keys(label_studio.admin.email)
        driver.find_element(By.NAME, "password").send_keys(label_studio.admin.password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        wait_until(lambda: "/user/login" not in driver.current_url, 30, 0.2)
        assert "/user/login" not in driver.current_url, "logging into Label Studio failed"
        yield driver
    finally:
        driver.quit()


@contextlib.contextmanager
def _evidence_on_failure(driver, out: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        driver.save_screenshot(str(out / "failure.png"))
        (out / "failure.html").write_text(driver.page_source)
        print(f"browser evidence: {out / 'failure.png'}, {out / 'failure.html'} (at {driver.current_url})")
        raise


def _until(driver, find, what: str, timeout_s: float = 60.0):
    """Poll ``find(driver)`` until it returns something truthy; fail naming ``what``."""
    found: list = []
    wait_until(lambda: bool(found.append(find(driver)) or found[-1]), timeout_s, 0.25)
    assert found and found[-1], f"{what} did not appear within {timeout_s:.0f} s (at {driver.current_url})"
    return found[-1]


def test_a_labeler_sees_the_label_next_tab_its_scores_and_a_pre_annotated_task(project, label_studio, browser,
                                                                              tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    css = browser.find_elements
    started = time.monotonic()
    with _evidence_on_failure(browser, tmp_path):
        browser.get(f"{label_studio.url}/projects/{project['pid']}/data")
        tabs = _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[role=tab][aria-label]"), "tabs")
        titles = [t.get_attribute("aria-label") for t in tabs]
        selected = [t.get_attribute("aria-label") for t in tabs if t.get_attribute("aria-selected") == "true"]
        assert LABEL_NEXT_TAB in titles and titles[0] == "Default", titles
        assert selected == ["Default"], selected  # the project's default tab stays Label Studio's own
        tabs[titles.index(LABEL_NEXT_TAB)].click()

        def rows_of_our_tab(d) -> list:
            rows = d.find_elements(By.CSS_SELECTOR, "[data-testid=table-row]")
            chosen = [t for t in d.find_elements(By.CSS_SELECTOR, "[role=tab][aria-selected=true]")]
            on_ours = bool(chosen) and chosen[0].get_attribute("aria-label") == LABEL_NEXT_TAB
            return rows if on_ours and len(rows) >= ROWS_CHECKED else []

        rows = _until(browser, rows_of_our_tab, "the rows of the label-next tab")
        heads = [h.text.strip() for h in css(By.CSS_SELECTOR, ".lsf-table-head .lsf-th")]
        assert "ID" in heads and "Prediction score" in heads, heads
        cells = [[c.text.strip() for c in r.find_elements(By.CSS_SELECTOR, ".lsf-table__cell")] for r in rows]
        shown_ids = [int(row[heads.index("ID")]) for row in cells[:ROWS_CHECKED]]
        shown_scores = [row[heads.index("Prediction score")] for row in cells[:ROWS_CHECKED]]
        queue = project["queue"]
        assert queue["cold_start"] is False and queue["version"] == project["version"], queue
        # the queue's order; tasks with the same score (the same suggestion) may come in either order
        rank_score = {t["task"]: t["score"] for t in queue["tasks"]}
        assert [rank_score.get(t) for t in shown_ids] == [t["score"] for t in queue["tasks"][:ROWS_CHECKED]], \
            (shown_ids, queue["tasks"][:8])
        assert all(s for s in shown_scores), shown_scores  # the column is not blank
        top_prob = [1 - t["score"] for t in queue["tasks"][:ROWS_CHECKED]]  # the queue ranks by 1 - p(best path)
        assert [float(s) for s in shown_scores] == pytest.approx(top_prob, abs=6e-4), (shown_scores, top_prob)

        # the first task of the order, opened from the tab: the labeling view shows the live version's suggestion
        first = shown_ids[0]
        prediction = next(p for p in label_studio.task(first)["predictions"]
                          if p["model_version"] == project["version"])
        leaf = prediction["result"][0]["value"]["taxonomy"][0][-1]
        rows[0].find_elements(By.CSS_SELECTOR, ".lsf-table__cell")[1].click()
        score = _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "span[title^='Prediction score = ']"),
                       "the prediction of the opened task")
        assert f"task={first}" in browser.current_url, browser.current_url
        assert float(score[0].get_attribute("title").split("=")[1]) == pytest.approx(prediction["score"], abs=1e-6)
        names = [n.text for n in css(By.CSS_SELECTOR, ".lsf-annotation-button__name")]
        version = project["version"]
        assert any(n.startswith(version[:8]) and n.endswith(version[-6:]) for n in names), (names, version)
        chosen = _until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".htx-taxonomy .ant-select-selection-item"),
                        "the pre-filled taxonomy choice")
        assert [c.get_attribute("title") for c in chosen] == [leaf]
    print(f"browser time: {time.monotonic() - started:.1f} s")
