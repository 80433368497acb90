"""The Database environment's limits, each hit for real: time, memory, size, temp files, refusals, processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from agentloop.envs.db import DBTask, SQLEnv, SQLEnvConfig, load_db_tasks
from agentloop.envs.db.engine import KILL_GRACE_S, DBWorker, EpisodeDB, build_template

JIU_JITSU = '"Jiu-Jitsu Championships Results"'  # train-0000's table, 18 rows
LIMIT_S = 0.3
SLACK_S = 2.0  # generous: the machine may be busy; without the limit these run for seconds to minutes

_CTE = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 9990), "
_AS = "(SELECT group_concat('a', '') FROM c)"
_A_B = _CTE + f"s(a, b) AS (SELECT {_AS}, (SELECT group_concat('b', '') FROM c WHERE x < 830) || 'a') "
_A_P = _CTE + "s(a, p) AS (SELECT " + _AS + ", '{}' || (SELECT group_concat('a', '') FROM c WHERE x < 98) || 'b') "
SLOW = {
    # One row, a long list of calls to one built-in (each statement fits in one action):
    # SQLite's progress handler barely runs between the calls and cannot stop one. Measured
    # with a 60 s limit: like and glob 0.5 s, the trims 3.5-4 s. (printf, which looped for
    # minutes, is refused: see REFUSED.)
    "like": _A_P.format("%") + "SELECT " + ",".join(["a LIKE p"] * 400) + " FROM s",
    "glob": _A_P.format("*") + "SELECT " + ",".join(["a GLOB p"] * 400) + " FROM s",
    "ltrim": _A_B + "SELECT " + "+".join(["length(ltrim(a,b))"] * 190) + " FROM s",
    "rtrim": _A_B + "SELECT " + "+".join(["length(rtrim(a,b))"] * 190) + " FROM s",
    "trim": _A_B + "SELECT " + "+".join(["length(trim(a,b))"] * 200) + " FROM s",
    "trim in an UPDATE": _A_B
    + f'UPDATE {JIU_JITSU} SET "Notes" = (SELECT '
    + "+".join(["length(trim(a,b))"] * 190)
    + " FROM s)",
}
LOOP = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
WIDE = "(SELECT group_concat('a', '') FROM (SELECT 1 FROM c LIMIT 100))"
SPILL = (  # sorts 20 MB: SQLite's default would spill it to a temp file
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000) "
    f"SELECT count(*) FROM (SELECT x FROM c ORDER BY {WIDE} || x)"
)
HUNGRY = (  # a 40 MB set of distinct values
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 400000) "
    f"SELECT count(DISTINCT {WIDE} || x) FROM c"
)


def operation(sql: str) -> str:
    return f"Action: Operation\n```sql\n{sql}\n```"


@pytest.fixture(scope="module")
def train_tasks(data_dir: Path) -> list[DBTask]:
    return load_db_tasks(data_dir, "train")


@pytest.fixture()
def env(train_tasks: list[DBTask]) -> SQLEnv:
    sql_env = SQLEnv(train_tasks[:1], SQLEnvConfig(query_timeout_s=LIMIT_S, max_turns=50))
    sql_env.reset(options={"task_id": "train-0000"})
    yield sql_env
    sql_env.close()


@pytest.fixture()
def worker() -> DBWorker:
    process = DBWorker(SQLEnvConfig().max_memory_mib)
    yield process
    process.stop()


def observe(env: SQLEnv, sql: str) -> str:
    return env.step(operation(sql))[0]


# --- time ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SLOW))
def test_a_slow_builtin_ends_within_the_time_limit_and_changes_nothing(env: SQLEnv, name: str) -> None:
    assert observe(env, f"INSERT INTO {JIU_JITSU} (\"Result\") VALUES ('kept')") == "Query OK, 1 row affected"
    started = time.monotonic()
    obs, _, _, _, info = env.step(operation(SLOW[name]))
    elapsed = time.monotonic() - started
    assert obs == f"Error: the statement ran longer than {LIMIT_S:g} s and was stopped" and info["sql_error"]
    assert elapsed < LIMIT_S + KILL_GRACE_S + SLACK_S
    assert observe(env, f'SELECT count(*), count("Notes") FROM {JIU_JITSU}') == "[(19, 18)]"


def test_a_builtin_sqlite_cannot_interrupt_gets_its_worker_killed_and_rolled_back(
    worker: DBWorker, train_tasks: list[DBTask]
) -> None:
    config = SQLEnvConfig(query_timeout_s=LIMIT_S)
    db = EpisodeDB(build_template(train_tasks[0]))
    worker.run(db, f"DELETE FROM {JIU_JITSU} WHERE \"Method\" = 'Decision'", config)
    committed, first = db.data, worker.pid
    assert worker.run(db, SLOW["trim in an UPDATE"], config).error
    assert (worker.restarts, db.data) == (1, committed) and worker.pid != first
    assert worker.run(db, f'SELECT count(*), count("Notes") FROM {JIU_JITSU}', config).text == "[(17, 17)]"


def test_a_loop_is_stopped_by_the_worker_itself_without_a_restart(worker: DBWorker, train_tasks: list[DBTask]) -> None:
    config = SQLEnvConfig(query_timeout_s=LIMIT_S)
    db = EpisodeDB(build_template(train_tasks[0]))
    first = worker.pid
    started = time.monotonic()
    result = worker.run(db, LOOP, config)
    assert result.text == f"Error: the statement ran longer than {LIMIT_S:g} s and was stopped"
    assert time.monotonic() - started < LIMIT_S + SLACK_S
    assert (worker.restarts, worker.pid) == (0, first)


def test_a_worker_that_died_is_replaced_and_the_database_kept(worker: DBWorker, train_tasks: list[DBTask]) -> None:
    config = SQLEnvConfig()
    db = EpisodeDB(build_template(train_tasks[0]))
    worker.run(db, f"DELETE FROM {JIU_JITSU}", config)
    os.kill(worker.pid, signal.SIGKILL)
    time.sleep(0.1)
    assert worker.run(db, f"SELECT count(*) FROM {JIU_JITSU}", config).text == "[(0,)]"


# --- memory, size, length -------------------------------------------------------------------


def test_a_statement_needing_more_memory_than_the_bound_fails_and_the_env_goes_on(train_tasks: list[DBTask]) -> None:
    env = SQLEnv(train_tasks[:1], SQLEnvConfig(max_memory_mib=32, query_timeout_s=20.0))
    try:
        env.reset()
        obs, _, _, _, info = env.step(operation(HUNGRY))
        assert obs == "Error: the statement needed more than 32 MiB of memory and was stopped" and info["sql_error"]
        assert observe(env, f"SELECT count(*) FROM {JIU_JITSU}") == "[(18,)]"
    finally:
        env.close()


def test_the_database_size_cap(train_tasks: list[DBTask]) -> None:
    env = SQLEnv(train_tasks[:1], SQLEnvConfig(max_db_pages=16))
    try:
        env.reset()
        fill = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5000) "
            f'INSERT INTO {JIU_JITSU} ("Notes") SELECT {WIDE} || x FROM c'
        )
        assert observe(env, fill) == "Error: the database is full (it may hold at most 16 pages of 4 KiB)"
        assert observe(env, f"SELECT count(*) FROM {JIU_JITSU}") == "[(18,)]"
    finally:
        env.close()


def test_value_length_like_pattern_and_statement_length_caps(
    env: SQLEnv, worker: DBWorker, train_tasks: list[DBTask]
) -> None:
    long_value = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 20000) "
        "SELECT length(group_concat('a', '')) FROM c"
    )
    assert observe(env, long_value) == "Error: string or blob too big (a value may hold at most 10000 bytes)"
    pattern = "'" + "%" * 101 + "'"
    assert observe(env, f"SELECT 'a' LIKE {pattern}") == "Error: LIKE or GLOB pattern too long (at most 100 characters)"
    assert observe(env, f"SELECT 'a' LIKE {pattern[:100]}'") == "[(1,)]"
    # An action is at most max_action_chars long; the worker refuses longer SQL all the same.
    db = EpisodeDB(build_template(train_tasks[0]))
    too_long = "SELECT 1" + " " * (4 * SQLEnvConfig().max_action_chars)
    assert (
        worker.run(db, too_long, SQLEnvConfig()).text == "Error: the statement is too long (at most 16000 characters)"
    )


def test_no_temporary_file_is_ever_opened(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, train_tasks: list[DBTask]
) -> None:
    # The control: SQLite's default (this process) spills the same sort to temp files.
    assert any(
        "etilqs" in path
        for path in open_files(os.getpid(), lambda: sqlite3.connect(":memory:").execute(SPILL).fetchall())
    )
    monkeypatch.setenv("SQLITE_TMPDIR", str(tmp_path))
    worker = DBWorker(SQLEnvConfig().max_memory_mib)  # started with the temp directory above
    try:
        db, config = EpisodeDB(build_template(train_tasks[0])), SQLEnvConfig(query_timeout_s=20.0)
        worker.run(db, "SELECT 1", config)
        paths = open_files(worker.pid, lambda: worker.run(db, SPILL, config))
        assert worker.run(db, SPILL, config).text == "[(200000,)]"
    finally:
        worker.stop()
    assert not [p for p in paths if "etilqs" in p or str(tmp_path) in p or p.startswith("/var/tmp")], paths
    assert list(tmp_path.iterdir()) == []


def open_files(pid: int, work: Callable[[], object]) -> set[str]:
    """Every path the process ``pid`` had open while ``work`` ran (its /proc fd links, polled)."""
    seen, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    seen.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        work()
    finally:
        done.set()
        watcher.join()
    return seen


# --- what is refused --------------------------------------------------------------------------

REFUSED = [
    ("SELECT fts3_tokenizer('simple')", "the function fts3_tokenizer() is not available here"),
    ("SELECT fts3_tokenizer('mine', x'0000000000000000')", "the function fts3_tokenizer() is not available here"),
    ("SELECT sqlite_version()", "the function sqlite_version() is not available here"),
    ("SELECT sqlite_source_id()", "the function sqlite_source_id() is not available here"),
    ("SELECT fts5_source_id()", "the function fts5_source_id() is not available here"),
    ("SELECT sqlite_compileoption_get(0)", "the function sqlite_compileoption_get() is not available here"),
    (
        "SELECT sqlite_compileoption_used('THREADSAFE')",
        "the function sqlite_compileoption_used() is not available here",
    ),
    ("SELECT sqlite_log(1, 'x')", "the function sqlite_log() is not available here"),
    ("SELECT fts5(NULL)", "the function fts5() is not available here"),
    ("SELECT rtreenode(2, x'00')", "the function rtreenode() is not available here"),
    ("SELECT rtreedepth(x'00')", "the function rtreedepth() is not available here"),
    ("SELECT rtreecheck('t')", "the function rtreecheck() is not available here"),
    ("SELECT matchinfo(1)", "the function matchinfo() is not available here"),
    ("SELECT snippet(1)", "the function snippet() is not available here"),
    ("SELECT offsets(1)", "the function offsets() is not available here"),
    ("SELECT highlight(1, 2, 3, 4)", "the function highlight() is not available here"),
    ("SELECT bm25(1)", "the function bm25() is not available here"),
    ("SELECT printf('%.*c', 2147483647, 'a')", "the function printf() is not available here"),
    ("SELECT format('%d', 1)", "the function format() is not available here"),
    ("SELECT hex(1)", "the function hex() is not available here"),
    ("SELECT zeroblob(1000000000)", "the function zeroblob() is not available here"),
    ("SELECT randomblob(4)", "the function randomblob() is not available here"),
    ("SELECT json_extract('{}', '$')", "the function json_extract() is not available here"),
    ("SELECT load_extension('/tmp/evil')", "the function load_extension() is not available here"),
    ("SELECT '{\"a\": 1}' -> 'a'", "the operator -> is not available here"),
    ("SELECT '{\"a\": 1}' ->> 'a'", "the operator ->> is not available here"),
    ("SELECT sql FROM sqlite_stmt", "the table-valued function or virtual table sqlite_stmt is not available here"),
    ("SELECT count(*) FROM dbstat", "the table-valued function or virtual table dbstat is not available here"),
    ("SELECT * FROM json_each('[1]')", "the table-valued function or virtual table json_each is not available here"),
    ("SELECT * FROM json_tree('[1]')", "the table-valued function or virtual table json_tree is not available here"),
    (
        "SELECT * FROM pragma_compile_options",
        "the table-valued function or virtual table pragma_compile_options is not available here",
    ),
    ("PRAGMA compile_options", "PRAGMA compile_options is not available here (only foreign_key_list, index_info,"),
    ("PRAGMA hard_heap_limit = 0", "PRAGMA hard_heap_limit is not available here"),
    ("PRAGMA temp_store = FILE", "PRAGMA temp_store is not available here"),
    ("PRAGMA max_page_count = 1000000", "PRAGMA max_page_count is not available here"),
    ("BEGIN", "transactions (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) are not available here"),
    ("SAVEPOINT a", "transactions (BEGIN, COMMIT, ROLLBACK, SAVEPOINT) are not available here"),
    ("ATTACH DATABASE ':memory:' AS x", "ATTACH, DETACH and VACUUM are not available here"),
    ("VACUUM", "ATTACH, DETACH and VACUUM are not available here"),
    ("ANALYZE", "ANALYZE and REINDEX are not available here"),
]


@pytest.mark.parametrize(("sql", "message"), REFUSED, ids=[sql[:40] for sql, _ in REFUSED])
def test_internals_and_unneeded_features_are_refused_by_name(env: SQLEnv, sql: str, message: str) -> None:
    obs, reward, _, _, info = env.step(operation(sql))
    assert obs.startswith(f"Error: {message}"), obs
    assert info["sql_error"] and not info["invalid"] and info["tamper_attempts"] == 0 and reward == 0.0


def test_what_the_tasks_need_still_runs(env: SQLEnv) -> None:
    assert observe(env, f"PRAGMA table_info({JIU_JITSU})").startswith("[(0, 'Result', 'TEXT', 0, None, 0)")
    assert observe(env, f"SELECT count(*) FROM pragma_table_info('{JIU_JITSU[1:-1]}')") == "[(5,)]"
    assert observe(env, "SELECT name FROM sqlite_master") == "[('Jiu-Jitsu Championships Results',)]"
    assert (
        observe(env, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 5) SELECT sum(x) FROM c")
        == "[(15,)]"
    )
    query = f'SELECT upper(substr("Notes", 1, 5)), round(avg(length("Event")), 1) FROM {JIU_JITSU}'
    query += " WHERE \"Method\" LIKE 'dec%'"
    assert observe(env, query) == "[('WOMEN', 50.0)]"


# --- processes ----------------------------------------------------------------------------


def test_the_worker_is_gone_after_close(train_tasks: list[DBTask]) -> None:
    before = {p.pid for p in psutil.Process().children()}
    env = SQLEnv(train_tasks[:1], SQLEnvConfig(max_memory_mib=40))  # its own worker: no other env shares it
    env.reset()
    env.step(operation("SELECT 1"))
    (pid,) = {p.pid for p in psutil.Process().children()} - before
    env.close()
    assert not psutil.pid_exists(pid)


def test_the_worker_dies_with_its_parent_even_mid_statement(data_dir: Path) -> None:
    slow = operation(SLOW["trim"])
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from agentloop.envs.db import SQLEnv, SQLEnvConfig, load_db_tasks\n"
        f"env = SQLEnv(load_db_tasks(Path({str(data_dir)!r}), 'train')[:1], SQLEnvConfig(query_timeout_s=600))\n"
        "env.reset()\nprint('ready', flush=True)\n"
        f"env.step({slow!r})\n"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as parent:
        try:
            assert parent.stdout.readline() == "ready\n"
            (worker,) = psutil.Process(parent.pid).children()
            time.sleep(0.5)  # the statement is running
            assert worker.status() == psutil.STATUS_RUNNING
        finally:
            parent.kill()
    gone, _ = psutil.wait_procs([worker], timeout=10)
    assert gone or worker.status() == psutil.STATUS_ZOMBIE


def test_the_worker_runs_under_its_process_limits(worker: DBWorker, train_tasks: list[DBTask]) -> None:
    worker.run(EpisodeDB(build_template(train_tasks[0])), "SELECT 1", SQLEnvConfig())  # started and locked down
    limits = {}
    for line in Path(f"/proc/{worker.pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), *line[26:68].split()
        limits[name] = (soft, hard)
    space = str((2 * worker.memory_mib + 128) << 20)
    assert limits["Max address space"] == (space, space)
    assert limits["Max file size"] == limits["Max core file size"] == ("0", "0")
