"""Reward integrity of the Database environment: what the agent plants never stands in for the task's table."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from agentloop.envs.contract import step_outcome
from agentloop.envs.db import DBTask, SQLEnv, SQLEnvConfig, load_db_tasks
from agentloop.envs.db.engine import KILL_GRACE_S, DBWorker, EpisodeDB, build_template, quote_identifier
from agentloop.envs.db.gold import canonical_sql

WRITE_TASKS = ("train-0100", "train-0200")  # an INSERT and an UPDATE task
SLOW_ROW = "printf('%.*c', 2147483647, 'a')"  # about 9 s a call on SQLite 3.40, and not interruptible


def operation(sql: str) -> str:
    return f"Action: Operation\n```sql\n{sql}\n```"


ANSWER = "Action: Answer\nFinal Answer: []"


@pytest.fixture(scope="module")
def tasks(data_dir: Path) -> dict[str, DBTask]:
    return {t.task.task_id: t for t in load_db_tasks(data_dir, "train")}


@pytest.fixture(scope="module")
def env(tasks: dict[str, DBTask]) -> SQLEnv:
    sql_env = SQLEnv([tasks[i] for i in WRITE_TASKS], SQLEnvConfig(query_timeout_s=0.5))
    yield sql_env
    sql_env.close()


def play(env: SQLEnv, task_id: str, statements: list[str]) -> tuple[float, int]:
    """The reward of the statements then an answer, and the tamper attempts counted on the way."""
    env.reset(options={"task_id": task_id})
    tampered = 0
    for sql in statements:
        _, _, _, _, info = env.step(operation(sql))
        tampered += step_outcome(info, "db").tamper_attempts
    _, reward, terminated, _, info = env.step(ANSWER)
    assert terminated and step_outcome(info, "db").tamper_attempts == 0
    return reward, tampered


def exploits(task: DBTask) -> dict[str, list[str]]:
    """Ways to make scoring read something else than ``main``'s real table, which each leave wrong.

    Each scored 1.0 before schema changes were refused and scoring checked the schema.
    """
    t, gold = quote_identifier(task.table_name), canonical_sql(task)
    on_copy = gold.replace(t, '"x"', 1)
    return {
        "a temp table shadows the real one": [
            f"CREATE TEMP TABLE {t} AS SELECT * FROM main.{t}",
            gold,
            f"DELETE FROM main.{t}",
        ],
        "a temp view over a copy": [
            f'CREATE TABLE "x" AS SELECT * FROM {t}',
            on_copy,
            f"DELETE FROM main.{t}",
            f'CREATE TEMP VIEW {t} AS SELECT * FROM main."x"',
        ],
        "the table replaced by a view": [
            f'CREATE TABLE "x" AS SELECT * FROM {t}',
            on_copy,
            f"DROP TABLE {t}",
            f'CREATE VIEW {t} AS SELECT * FROM "x"',
        ],
        "the table recreated with CREATE AS": [
            f'CREATE TABLE "x" AS SELECT * FROM {t}',
            on_copy,
            f"DROP TABLE {t}",
            f'CREATE TABLE {t} AS SELECT * FROM "x"',
        ],
    }


@pytest.mark.parametrize("task_id", WRITE_TASKS)
def test_the_right_table_scores_one_even_after_refused_schema_changes(
    env: SQLEnv, tasks: dict[str, DBTask], task_id: str
) -> None:
    task = tasks[task_id]
    t, gold = quote_identifier(task.table_name), canonical_sql(task)
    assert play(env, task_id, [gold]) == (1.0, 0)
    index = f'CREATE INDEX "i" ON {t} ({quote_identifier(task.columns[0][0])})'
    assert play(env, task_id, ['CREATE TEMP TABLE "scratch" ("a")', gold, index]) == (1.0, 2)
    assert play(env, task_id, []) == (0.0, 0)


@pytest.mark.parametrize("task_id", WRITE_TASKS)
@pytest.mark.parametrize(
    "name",
    ["a temp table shadows the real one", "a temp view over a copy", "the table replaced by a view",
     "the table recreated with CREATE AS"],
)  # fmt: skip
def test_an_exploit_leaving_the_real_table_wrong_scores_zero_and_is_counted(
    env: SQLEnv, tasks: dict[str, DBTask], task_id: str, name: str
) -> None:
    statements = exploits(tasks[task_id])[name]
    schema_changes = sum(s.startswith(("CREATE", "DROP", "ALTER")) for s in statements)
    reward, tampered = play(env, task_id, statements)
    assert reward == 0.0
    assert tampered == schema_changes > 0


def test_a_refused_schema_change_says_why(env: SQLEnv, tasks: dict[str, DBTask]) -> None:
    env.reset(options={"task_id": "train-0100"})
    t = quote_identifier(tasks["train-0100"].table_name)
    attempts = [
        f"DROP TABLE {t}",
        f"CREATE TEMP VIEW {t} AS SELECT 1",
        f"ALTER TABLE {t} ADD COLUMN z",
        f"ALTER TABLE {t} RENAME TO x",
        f'CREATE TEMP TRIGGER "w" AFTER DELETE ON main.{t} BEGIN SELECT 1; END',
        "PRAGMA writable_schema = ON",
        "DELETE FROM sqlite_master",
    ]
    for sql in attempts:
        obs, _, _, _, info = env.step(operation(sql))
        assert info["tamper_attempts"] == 1 and info["sql_error"], sql
        assert obs.startswith(("Error: changing the schema", "Error: PRAGMA writable_schema is not available")), obs
        env.reset(options={"task_id": "train-0100"})


def test_scoring_cannot_be_made_slow(env: SQLEnv, tasks: dict[str, DBTask]) -> None:
    t = quote_identifier(tasks["train-0100"].table_name)
    env.reset(options={"task_id": "train-0100"})
    env.step(operation(f"CREATE TEMP VIEW {t} AS SELECT {SLOW_ROW}, {SLOW_ROW}, {SLOW_ROW}"))
    started = time.monotonic()
    _, reward, terminated, _, _ = env.step(ANSWER)
    assert terminated and reward == 0.0
    assert time.monotonic() - started < 0.5 + KILL_GRACE_S + 2.0


def test_scoring_reads_the_table_only_while_the_schema_is_the_templates(tasks: dict[str, DBTask]) -> None:
    """The schema check behind the refusals: a database shaped some other way is never read."""
    task = tasks["train-0100"]
    template, config = build_template(task), SQLEnvConfig()
    t, columns = quote_identifier(task.table_name), '"Year" INTEGER, "Title" TEXT, "Role" TEXT'
    worker = DBWorker(config.max_memory_mib)
    try:
        assert worker.read_table(EpisodeDB(template), config) == template_rows(template.data, t)
        shaped = {
            "no NOCASE": [f"CREATE TABLE {t} ({columns})"],
            "an extra index": [template.schema[0][3], f'CREATE INDEX "i" ON {t} ("Title")'],
            "a view": ['CREATE TABLE "x" (' + columns + ")", f'CREATE VIEW {t} AS SELECT * FROM "x"'],
            "a trigger": [template.schema[0][3], f'CREATE TRIGGER "g" AFTER INSERT ON {t} BEGIN SELECT 1; END'],
        }
        for name, ddl in shaped.items():
            db = EpisodeDB(template)
            db.data = database(ddl, t if name != "a view" else '"x"', task)
            assert worker.read_table(db, config) is None, name
    finally:
        worker.stop()


def database(ddl: list[str], table: str, task: DBTask) -> bytes:
    conn = sqlite3.connect(":memory:")
    for statement in ddl:
        conn.execute(statement)
    conn.executemany(f"INSERT INTO {table} VALUES (?, ?, ?)", task.rows)
    conn.commit()
    return conn.serialize()


def template_rows(data: bytes, table: str) -> object:
    from collections import Counter

    conn = sqlite3.connect(":memory:")
    conn.deserialize(data)
    return Counter(conn.execute(f"SELECT * FROM {table}"))
