"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright): the charts draw,
a trajectory and a pair render (agent markup stays text), and the run view follows a stage written meanwhile."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator

import pytest
from dashboard_run import SCRIPT, task, trajectory
from localnet import free_port

from agentloop.replay import ReplayStore

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def serve(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free local port, in a thread, until the generator is closed."""
    import uvicorn

    port = free_port()
    served = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not served.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    served.should_exit = True
    thread.join(10)


@pytest.fixture
def server(run_store) -> Iterator[str]:
    """The dashboard of the run store."""
    from agentloop.dashboard import create_app

    path, _ = run_store
    yield from serve(create_app(f"sqlite:///{path}"))


@pytest.fixture
def runs_server(run_store) -> Iterator[str]:
    """The dashboard of a directory of runs: the run store's (``run``) and a copy of it (``copy``)."""
    from agentloop.dashboard import create_runs_app

    path, _ = run_store
    (path.parent.parent / "copy").mkdir()
    shutil.copy(path, path.parent.parent / "copy" / path.name)
    yield from serve(create_runs_app(path.parent.parent))


@pytest.fixture
def page(server):
    """A Chromium page; fails the test on any console error (a CSP violation, a script error)."""
    missing = "" if CHROMIUM else "chromium not installed (apt-get install chromium; scripts/setup.sh installs it)"
    try:
        from playwright import sync_api
    except ImportError:
        missing = "playwright not installed (pip install -e .[dev])"
    if missing:
        if os.environ.get("CI") == "true":  # CI installs both (scripts/setup.sh): there the browser tests must run
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        tab = browser.new_page()
        errors: list[str] = []
        tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.set_default_timeout(60_000)  # generous: a loaded CI machine, and waiting costs nothing when it passes
        yield tab
        browser.close()
        assert not errors, errors


def drawn_pixels(page, canvas_id: str) -> int:
    """How many pixels of a canvas something was drawn on."""
    return page.evaluate(
        """(id) => {
            const c = document.getElementById(id);
            const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < data.length; i += 4) if (data[i] > 0) n++;
            return n;
        }""",
        canvas_id,
    )


# Predicates are functions: Playwright evaluates a bare expression with eval(), which the dashboard's
# Content-Security-Policy (no 'unsafe-eval') refuses.


def test_the_run_view_draws_its_charts(page, server):
    page.goto(server)
    page.wait_for_function("() => document.body.dataset.chartsVersion !== undefined")
    for canvas in ("chart-eval", "chart-explore", "chart-timing"):
        assert drawn_pixels(page, canvas) > 500, canvas
    labels = page.evaluate("Chart.getChart('chart-eval').data.labels")
    assert labels == ["eval/base", "eval/1"]
    assert page.locator("li.running").inner_text().startswith("explore/2: 2 of 8 tasks begun")


def test_a_trajectory_opens_from_the_browser_and_shows_markup_as_text(page, server, run_store):
    _, ids = run_store
    page.goto(f"{server}/trajectories?task_id=train-99")
    page.click(f"a[href$='/trajectories/{ids['hostile']}']")
    page.wait_for_selector("#conversation")
    assert page.locator("#conversation .turn").count() == 4
    texts = page.locator("#conversation pre.text").all_inner_texts()
    assert texts[0] == SCRIPT and texts[-1] == f"Action: Answer\n{SCRIPT}"
    assert page.evaluate("window.pwned") is None and page.locator("#conversation img").count() == 0
    assert page.locator("#outcome").inner_text().startswith("failure")


def test_a_pair_renders_side_by_side(page, server, run_store):
    _, ids = run_store
    page.goto(f"{server}/pairs")
    page.click(f"a[href$='/pairs/{ids['pair']}']")
    page.wait_for_selector("table.pair")
    assert page.locator("td.chosen .turn").count() == 4 and page.locator("td.rejected .turn").count() == 2
    assert "0.4321" in page.locator("#margin").inner_text()


def test_the_run_view_follows_a_stage_written_meanwhile(page, server, run_store):
    path, _ = run_store
    page.goto(server)
    page.wait_for_function("() => document.body.dataset.chartsVersion !== undefined")
    assert page.locator("tr[data-stage='eval/2']").count() == 0
    with ReplayStore(f"sqlite:///{path}") as store:
        store.commit_stage("explore/2", metrics={"timing/explore": 5.0})
        later = [trajectory(task(env, n), success=n < 3, source="eval", iteration=2, version=3)
                 for env in ("db", "os") for n in range(4)]  # fmt: skip
        store.commit_stage("eval/2", trajectories=later, metrics={"timing/eval": 9.0})
    page.wait_for_selector("tr[data-stage='eval/2']")  # no reload: the page polls
    page.wait_for_function("() => Chart.getChart('chart-eval').data.labels.includes('eval/2')")
    assert page.evaluate("Chart.getChart('chart-eval').data.datasets.find(d => d.label === 'db').data") == [
        0.5,
        1.0,
        0.75,
    ]
    assert page.locator("li.running").count() == 0


def test_a_run_opened_from_the_list_of_runs_draws_and_follows_under_its_prefix(page, runs_server, run_store):
    path, _ = run_store
    page.goto(runs_server)
    page.click("tr[data-run='run'] a")
    page.wait_for_function("() => document.body.dataset.chartsVersion !== undefined")
    assert page.url == f"{runs_server}/runs/run/" and drawn_pixels(page, "chart-eval") > 500
    with ReplayStore(f"sqlite:///{path}") as store:
        store.commit_stage("explore/2", metrics={"timing/explore": 5.0})
    page.wait_for_function("() => document.querySelectorAll('li.running').length === 0")  # polled under /runs/run/
    page.click("text=All runs")
    assert page.locator("tr[data-run]").count() == 2
