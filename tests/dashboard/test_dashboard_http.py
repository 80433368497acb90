"""The dashboard over HTTP (starlette's TestClient) on a real SQLite replay store: every page, the filters,
escaping of agent output, the read-only store, the token, and the command line."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from dashboard_run import SCRIPT, build_run, task, trajectory
from starlette.testclient import TestClient

from agentloop.cli import cli
from agentloop.dashboard import create_app
from agentloop.dashboard.queries import StoreError, StoreReader, read_only_engine, split_thought
from agentloop.replay import ReplayStore


@pytest.fixture
def client(run_store):
    path, _ = run_store
    with TestClient(create_app(f"sqlite:///{path}")) as c:
        yield c


def rows(html: str, table_id: str) -> int:
    body = html.split(f'id="{table_id}"', 1)[1].split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return body.count("<tr") - body.count('class="muted"')


# Run view


def test_the_run_view_shows_every_stage_with_its_figures(client):
    html = client.get("/").text
    for stage in ("experts", "eval/base", "sft", "explore/1", "dpo/1", "eval/1", "explore/2"):
        assert f'data-stage="{stage}"' in html
    running = html.split('<li class="running" data-stage="explore/2">', 1)[1].split("</li>", 1)[0]
    assert "2 of 8 tasks begun" in running and "2 episodes stored" in running and ", for " in running
    assert '<canvas id="chart-eval">' in html and "chart.umd.min.js" in html


def test_the_run_data_has_intervals_pairs_times_and_throughput(client):
    run = client.get("/api/run").json()
    stages = {s["name"]: s for s in run["stages"]}
    base = stages["eval/base"]["envs"]["db"]
    assert base["episodes"] == 4 and base["successes"] == 2 and base["success_rate"] == 0.5
    assert 0.15 < base["ci_low"] < 0.16 and 0.84 < base["ci_high"] < 0.85  # Wilson 2/4: [0.150, 0.850]
    assert stages["dpo/1"]["pairs_built"] == 5 and stages["dpo/1"]["dpo_margin"] == pytest.approx(0.4321)
    assert stages["explore/1"]["tokens_per_s"] == 80.0 and stages["sft"]["seconds"] == 30.0
    assert stages["explore/1"]["envs"]["db"]["invalid_action_rate"] == pytest.approx(3 / 10)  # 3 failures of 5
    assert stages["explore/2"]["running"] and stages["explore/2"]["iteration"] == 2
    (progress,) = run["progress"]
    assert progress | {"elapsed_seconds": 0, "eta_seconds": 0} == {
        "stage": "explore/2", "done": 2, "total": 8, "episodes": 2, "elapsed_seconds": 0, "eta_seconds": 0
    }  # fmt: skip
    assert 0 <= progress["elapsed_seconds"] < 600 and 0 <= progress["eta_seconds"] < 600
    assert run["curves"]["eval"]["labels"] == ["eval/base", "eval/1"]
    assert run["curves"]["eval"]["series"]["os"]["rate"] == [0.5, 1.0]


def test_the_version_changes_when_the_run_writes_and_the_view_follows(client, run_store):
    path, _ = run_store
    before = client.get("/api/version").json()["version"]
    assert client.get("/api/version").json()["version"] == before
    with ReplayStore(f"sqlite:///{path}") as store:
        store.add_episodes([trajectory(task("os", n), success=False, iteration=2) for n in range(3)], "explore/2")
        store.commit_stage("explore/2", metrics={"timing/explore": 5.0})
    assert client.get("/api/version").json()["version"] != before
    fragment = client.get("/fragments/run").text
    assert "explore/2 <em>(running)" not in fragment and "No stage running" in fragment
    stages = {s["name"]: s for s in client.get("/api/run").json()["stages"]}
    assert stages["explore/2"]["episodes"] == 5 and not stages["explore/2"]["running"]


def test_progress_counts_tasks_shows_training_stages_and_reads_older_stores(tmp_path):
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    tasks = [task("db", n) for n in range(3)]
    with ReplayStore(url) as store:
        store.commit_stage("experts", trajectories=[trajectory(t, success=True, source="expert") for t in tasks],
                           metrics={})  # fmt: skip
        # STE's trials: the first task's chain has two trials, the second began; no begun record (older store)
        first = trajectory(tasks[0], success=False)
        store.add_episodes([first, replace(first, trial=1), trajectory(tasks[1], success=False)], "explore/1")
    reader = StoreReader(url)
    (progress,) = reader.run()["progress"]
    assert (progress["done"], progress["total"], progress["episodes"]) == (2, 3, 3)  # the experts' tasks
    assert progress["elapsed_seconds"] is None
    with ReplayStore(url) as store:
        store.commit_stage("explore/1", metrics={})
        store.begin_stage("dpo/1")
    before = reader.version()
    (progress,) = reader.run()["progress"]
    assert progress["stage"] == "dpo/1" and progress["total"] is None and progress["elapsed_seconds"] >= 0
    with TestClient(create_app(url)) as client:
        assert re.search(r"<strong>dpo/1</strong>:\s*running \(a training stage", client.get("/fragments/run").text)
        with ReplayStore(url) as store:
            store.commit_stage("dpo/1", metrics={})
            store.begin_stage("eval/1", tasks=3)
        assert reader.version() != before  # a stage beginning is news to the page
        (progress,) = reader.run()["progress"]
        assert (progress["stage"], progress["done"], progress["total"]) == ("eval/1", 0, 3)
        assert "0 of 3 tasks begun" in client.get("/fragments/run").text
    reader.close()


def test_a_resumed_stage_paces_its_eta_on_the_tasks_begun_since_it_resumed(tmp_path):
    import time

    url = f"sqlite:///{tmp_path / 'replay.db'}"
    tasks = [task("db", n) for n in range(10)]
    with ReplayStore(url) as store:
        store.begin_stage("eval/1", tasks=10)
        store.add_episodes([trajectory(t, success=True, source="eval") for t in tasks[:6]], "eval/1")
        time.sleep(0.05)
        store.begin_stage("eval/1", tasks=10)  # killed, then resumed
    reader = StoreReader(url)
    (progress,) = reader.run()["progress"]
    assert progress["done"] == 6 and progress["eta_seconds"] is None  # nothing begun since: no pace yet
    time.sleep(0.2)
    with ReplayStore(url) as store:
        store.add_episodes([trajectory(tasks[6], success=True, source="eval")], "eval/1")
    (progress,) = reader.run()["progress"]
    # one task in about 0.2 s since the resume, three to go: about 0.6 s (not 3/7 of it, not negative)
    assert progress["done"] == 7 and 0.45 < progress["eta_seconds"] < 5
    reader.close()


def test_a_run_that_stopped_beating_with_a_stage_unfinished_is_shown_stopped(tmp_path):
    import json
    from datetime import UTC, datetime, timedelta

    from agentloop.dashboard.queries import STOPPED_AFTER
    from agentloop.loop import Heartbeat

    url = f"sqlite:///{tmp_path / 'replay.db'}"
    tasks = [task("db", n) for n in range(4)]

    def last_beat(ago: float) -> None:  # as a run killed ``ago`` seconds ago left it
        with sqlite3.connect(tmp_path / "replay.db") as db:
            at = (datetime.now(UTC) - timedelta(seconds=ago)).isoformat()
            db.execute("UPDATE meta SET value = ? WHERE key = 'alive'", (json.dumps({"at": at, "pid": 1}),))

    with ReplayStore(url) as store:
        beating = Heartbeat(store, every=0.05)  # what a run does while it lives
        store.begin_stage("eval/1", tasks=4)
        store.add_episodes([trajectory(t, success=True, source="eval") for t in tasks[:2]], "eval/1")
        reader = StoreReader(url)
        first = reader.last_beat()
        for _ in range(200):  # the database's clock (SQLite's to the second)
            if reader.last_beat() != first:
                break
            time.sleep(0.02)
        assert reader.last_beat() > first and reader.stopped_since() is None  # it beats on
        beating.close()
    with TestClient(create_app(url)) as client:
        before = client.get("/api/version").json()["version"]
        assert "has stopped" not in client.get("/fragments/run").text
        last_beat(ago=STOPPED_AFTER + 5)  # killed: no more beats, nothing more written
        assert client.get("/api/version").json()["version"] != before  # the page learns it
        page = client.get("/fragments/run").text
        assert "The run has stopped</strong>: no sign of it since" in page and "ETA" not in page
        assert re.search(r"eval/1</a> <em>\(unfinished\)", page)
        assert client.get("/api/run").json()["stopped_since"] is not None
        with ReplayStore(url) as store:
            store.commit_stage("eval/1", metrics={})  # nothing unfinished: a finished run is not "stopped"
        assert reader.stopped_since() is None and "has stopped" not in client.get("/fragments/run").text
    reader.close()


def test_a_store_that_never_beat_is_never_shown_stopped(run_store):
    path, _ = run_store  # a stage running, no heartbeat: a store of an older agentloop
    reader = StoreReader(f"sqlite:///{path}")
    assert reader.run()["progress"] and reader.last_beat() is None and reader.stopped_since() is None
    reader.close()


# Trajectories


def test_the_browser_filters_by_every_field(client):
    assert (
        rows(client.get("/trajectories").text, "trajectory-list") == 35
    )  # experts 8, eval/base 8, explore/1 9, eval/1 8, explore/2 2
    cases = {
        "stage=eval/base": 8,
        "stage=explore/1&env=db": 5,
        "iteration=0": 16,
        "source=expert": 8,
        "success=true&stage=explore/1": 3,
        "success=false&stage=explore/1": 6,
        "task_id=train-99": 1,
        "policy_version=2": 10,
        "env=os&source=eval&iteration=1": 4,
    }
    for query, expected in cases.items():
        assert rows(client.get(f"/trajectories?{query}").text, "trajectory-list") == expected, query
    assert client.get("/trajectories?iteration=x").status_code == 400


def test_the_browser_pages_back_by_id(client):
    html = client.get("/trajectories").text
    ids = [int(i) for i in re.findall(r'<td><a href="[^"]*/trajectories/(\d+)">', html)]
    assert ids == sorted(ids, reverse=True)
    older = client.get(f"/trajectories?before={ids[10]}").text
    assert rows(older, "trajectory-list") == len(ids) - 11


def test_a_trajectory_renders_turn_by_turn_with_trained_tokens(client):
    html = client.get("/trajectories/2").text  # the demonstration of db/train-1, chosen by a pair
    assert html.count('class="turn user') == 2 and html.count('class="turn assistant') == 2
    assert 'pre class="thought">I should look at the table.</pre>' in html
    assert '<pre class="text">Action: Operation\nSELECT a FROM t</pre>' in html
    assert html.count('class="trained"') == 2 and "3 tokens" in html and "context (mask 0)" in html
    assert "(dpo/1, chosen)" in html and "Trained on by SFT on demonstrations; dpo/1: pair #" in html
    assert client.get("/trajectories/99999").status_code == 404


def test_only_what_was_trained_on_is_marked_trained(client, run_store):
    path, _ = run_store
    with sqlite3.connect(path) as db:
        (rejected,) = db.execute("SELECT rejected_id FROM pairs ORDER BY id LIMIT 1").fetchone()
        (evaluated,) = db.execute("SELECT id FROM trajectories WHERE source = 'eval' LIMIT 1").fetchone()
        (unpaired,) = db.execute(
            "SELECT id FROM trajectories WHERE stage = 'explore/1' AND success "
            "AND id NOT IN (SELECT chosen_id FROM pairs)"
        ).fetchone()
    html = client.get(f"/trajectories/{rejected}").text  # cut after its first agent turn
    assert html.count('class="trained"') == 1 and html.count("not trained") == 1
    assert "rejected, up to message #1" in html
    html = client.get(f"/trajectories/{evaluated}").text
    assert html.count('class="trained"') == 0 and "Not trained on: an evaluation episode" in html
    html = client.get(f"/trajectories/{unpaired}").text  # a success of ETO's exploration: no pair, no round SFT
    assert html.count('class="trained"') == 0 and "Not trained on (yet)" in html


def test_agent_output_is_shown_as_text_never_as_markup(client, run_store):
    _, ids = run_store
    for url in (f"/trajectories/{ids['hostile']}", "/tasks/db/train-99"):
        html = client.get(url).text
        assert "<script>window.pwned" not in html and "<img src=x" not in html
    html = client.get(f"/trajectories/{ids['hostile']}").text
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]


# Pairs and tasks


def test_a_pair_shows_both_sides_the_divergence_and_the_margin(client, run_store):
    _, ids = run_store
    assert rows(client.get("/pairs").text, "pair-list") == ids["pairs"]
    assert rows(client.get("/pairs?stage=dpo/1&env=os").text, "pair-list") == 3
    html = client.get(f"/pairs/{ids['pair']}").text
    assert 'id="diverge">never' in html  # the cut keeps the first two messages, which the expert shares
    assert "dpo/rewards/margins = 0.4321" in html
    assert "2 later messages dropped" in html
    assert html.count('td class="chosen"') == 4 and html.count('class="turn user') == 3
    assert client.get("/pairs/12345").status_code == 404


def test_the_divergence_is_the_first_differing_message(run_store, tmp_path):
    path, _ = run_store
    from agentloop.dashboard.queries import divergence

    a = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    b = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}]
    assert divergence(a, b) == 1 and divergence(a, a[:1]) is None


def test_a_task_lists_its_attempts_across_rounds(client):
    html = client.get("/tasks/db/train-1").text
    assert rows(html, "attempts") == 5  # experts, eval/base, explore/1, eval/1, explore/2
    stages = re.findall(r"<td>\d+</td><td>([a-z/0-9]+)</td><td>(?:expert|eval|explore)</td>", html)
    assert stages == ["experts", "eval/base", "explore/1", "eval/1", "explore/2"]
    assert client.get("/tasks/db/nothing").status_code == 404


def test_thoughts_and_actions_split_where_the_action_starts():
    assert split_thought("Thought: think\nAction: go") == ("think", "Action: go")
    assert split_thought("Act: bash\nls") == ("", "Act: bash\nls")
    assert split_thought("no format at all") == ("", "no format at all")


# Safety


def test_the_dashboard_cannot_write_the_store(run_store):
    path, _ = run_store
    engine = read_only_engine(f"sqlite:///{path}")
    with engine.connect() as c, pytest.raises(Exception, match="readonly|read-only|query_only"):
        c.exec_driver_sql("DELETE FROM trajectories")
    engine.dispose()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM trajectories").fetchone()[0] > 0


def test_the_store_file_is_never_created_or_changed(tmp_path, run_store):
    with pytest.raises(StoreError, match="no replay store"):
        create_app(f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (a)").connection.commit()
    with pytest.raises(StoreError, match="cannot read a replay store"):
        create_app(f"sqlite:///{other}")


@pytest.mark.integration
def test_a_postgresql_store_is_shown_and_never_written(postgres_server):
    url = postgres_server.create_database("dashboard_run")
    ids = build_run(url)
    with TestClient(create_app(url)) as c:
        stages = {s["name"]: s for s in c.get("/api/run").json()["stages"]}
        assert stages["eval/base"]["envs"]["db"]["successes"] == 2 and stages["explore/2"]["running"]
        (progress,) = c.get("/api/run").json()["progress"]  # the stage's begun record, read on PostgreSQL
        assert (progress["done"], progress["total"]) == (2, 8) and progress["eta_seconds"] is not None
        assert "&lt;script&gt;" in c.get(f"/trajectories/{ids['hostile']}").text
        assert c.get(f"/pairs/{ids['pair']}").status_code == 200 and c.get("/tasks/db/train-1").status_code == 200
        assert rows(c.get("/trajectories?stage=explore/1&env=db").text, "trajectory-list") == 5
    engine = read_only_engine(url)
    with engine.connect() as connection, pytest.raises(Exception, match="read-only transaction"):
        connection.exec_driver_sql("DELETE FROM pairs")
    engine.dispose()


def test_a_token_is_required_when_given(run_store):
    path, _ = run_store
    with TestClient(create_app(f"sqlite:///{path}", token="s3cret")) as c:
        assert c.get("/").status_code == 401
        assert c.get("/api/run").status_code == 401 and c.get("/static/run.js").status_code == 401
        assert c.get("/", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/api/version", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        opened = c.get("/trajectories?token=s3cret&env=db", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == "/trajectories?env=db"
        assert c.get("/trajectories?env=db").status_code == 200  # the cookie carries it now


def test_other_hosts_are_refused_when_hosts_are_pinned(run_store):
    path, _ = run_store
    with TestClient(create_app(f"sqlite:///{path}", allowed_hosts=["127.0.0.1"]), base_url="http://evil.test") as c:
        assert c.get("/").status_code == 400


# Command line


def test_binding_off_localhost_needs_a_token(run_store):
    path, _ = run_store
    result = CliRunner().invoke(cli, ["dashboard", "--store", str(path.parent), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output


def test_the_command_refuses_a_missing_store(tmp_path):
    result = CliRunner().invoke(cli, ["dashboard", "--store", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no replay store" in result.output


def test_dashboard_help_imports_no_server_or_heavy_library():
    heavy = ("torch", "ray", "transformers", "datasets", "fastapi", "uvicorn", "starlette", "jinja2")
    code = (
        "import sys\nfrom agentloop.cli import main\nsys.argv = ['agentloop', 'dashboard', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--token" in out and out.strip().endswith("[]")


def test_a_fresh_store_renders(tmp_path: Path):
    ReplayStore(f"sqlite:///{tmp_path / 'r.db'}").close()
    with TestClient(create_app(f"sqlite:///{tmp_path / 'r.db'}")) as c:
        assert "The store holds no stage yet" in c.get("/").text
        assert c.get("/trajectories").status_code == 200 and c.get("/pairs").status_code == 200


def test_build_run_is_deterministic(tmp_path):
    assert build_run(f"sqlite:///{tmp_path / 'a.db'}") == build_run(f"sqlite:///{tmp_path / 'b.db'}")
    assert SCRIPT.startswith("<script>")


def test_the_dashboard_imports_no_learning_stack():
    import ast

    package = Path(__file__).resolve().parents[2] / "agentloop" / "dashboard"
    banned = ("torch", "ray", "vllm", "transformers", "agentloop.actors", "agentloop.policy", "agentloop.learners")
    found = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
    assert not [n for n in found if any(n == b or n.startswith(b + ".") for b in banned)]


# A directory of runs


def test_a_directory_of_runs_lists_them_and_serves_each_under_its_name(tmp_path):
    from agentloop.dashboard import create_runs_app

    for name in ("eto-seed0", "full-seed0"):
        build_run(f"sqlite:///{tmp_path / name / 'replay.db'}")
    (tmp_path / "not-a-run").mkdir()
    with TestClient(create_runs_app(tmp_path)) as client:
        index = client.get("/").text
        assert 'data-run="eto-seed0"' in index and 'data-run="full-seed0"' in index and "not-a-run" not in index
        assert 'href="http://testserver/runs/eto-seed0/"' in index
        assert "eval/1: db 4/4 (100.0%) os 4/4 (100.0%)" in index and "explore/2" in index  # latest eval, running
        page = client.get("/runs/full-seed0/").text
        assert 'href="http://testserver/runs/full-seed0/trajectories"' in page and ">All runs</a>" in page
        assert 'data-run-url="http://testserver/runs/full-seed0/api/run"' in page  # what run.js fetches
        assert client.get("/runs/full-seed0/api/run").json()["stages"][0]["name"] == "experts"
        assert client.get("/runs/full-seed0/trajectories/1").status_code == 200
        assert client.get("/runs/full-seed0/static/run.js").status_code == 200
        assert client.get("/runs/nothing/").status_code == 404
        build_run(f"sqlite:///{tmp_path / 'started-later' / 'replay.db'}")
        assert 'data-run="started-later"' in client.get("/").text  # found again on every visit
        assert client.get("/runs/started-later/pairs").status_code == 200
        with sqlite3.connect(tmp_path / "eto-seed0" / "replay.db") as db:  # read-only there too
            (before,) = db.execute("SELECT count(*) FROM trajectories").fetchone()
    with sqlite3.connect(tmp_path / "eto-seed0" / "replay.db") as db:
        assert db.execute("SELECT count(*) FROM trajectories").fetchone() == (before,)


def test_a_directory_of_runs_needs_the_token_too(tmp_path):
    from agentloop.dashboard import create_runs_app

    build_run(f"sqlite:///{tmp_path / 'run' / 'replay.db'}")
    with TestClient(create_runs_app(tmp_path, token="s3cret")) as client:
        assert client.get("/").status_code == 401 and client.get("/runs/run/").status_code == 401
        assert client.get("/runs/run/api/run", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_the_command_serves_a_directory_of_runs_and_refuses_one_without(tmp_path):
    result = CliRunner().invoke(cli, ["dashboard", "--store", str(tmp_path)])
    assert result.exit_code == 2 and "neither a run directory nor a directory of runs" in result.output


def test_a_directory_of_runs_serves_only_its_own_stores(tmp_path):
    from agentloop.dashboard import create_runs_app

    runs, outside = tmp_path / "runs", tmp_path / "outside"
    build_run(f"sqlite:///{outside / 'replay.db'}")
    build_run(f"sqlite:///{runs / 'ok' / 'replay.db'}")
    for name in ("x%2F..%2F..%2Foutside", "a?b", ".hidden"):  # names a URL would decode, or hidden ones
        (runs / name).mkdir()
        (runs / name / "replay.db").write_bytes((outside / "replay.db").read_bytes())
    (runs / "linked").symlink_to(outside)  # a link leading out of the directory
    (runs / "broken").mkdir()
    (runs / "broken" / "replay.db").write_text("not a database")
    with TestClient(create_runs_app(runs)) as client:
        index = client.get("/").text
        assert re.findall(r'data-run="([^"]+)"', index) == ["broken", "ok"]
        assert "cannot read a replay store" in index  # listed, not linked
        for name in ("x%252F..%252F..%252Foutside", "x%2F..%2F..%2Foutside", "linked", ".hidden", "a%3Fb"):
            assert client.get(f"/runs/{name}/api/run").status_code == 404, name
        assert client.get("/runs/broken/").status_code == 503
        assert client.get("/runs/ok/api/run").status_code == 200
        # a run deleted and started again under the same name is read afresh, not from the old file
        (runs / "ok" / "replay.db").unlink()
        assert client.get("/runs/ok/api/run").status_code == 404
        with ReplayStore(f"sqlite:///{runs / 'ok' / 'replay.db'}") as store:
            store.commit_stage("experts", metrics={})
        assert [s["name"] for s in client.get("/runs/ok/api/run").json()["stages"]] == ["experts"]


def test_a_continual_runs_demonstrations_are_not_claimed_trained_by_a_phase_it_cannot_tell(tmp_path):
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    with ReplayStore(url) as store:
        store.commit_stage("experts", trajectories=[trajectory(task("os", 0), success=True, source="expert")],
                           metrics={})  # fmt: skip
        store.commit_stage("sft/1", metrics={})
    with TestClient(create_app(url)) as client:
        html = client.get("/trajectories/1").text
    assert "Trained on by maybe sft/1 (the phase whose envs include os)." in html
    assert html.count('class="trained"') == 0
