"""Expert demonstrations: generic replay, and the dbbench experts built from gold SQL."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import sqlglot
from sqlglot import exp

from agentloop.config import ConfigError
from agentloop.envs import build_experts
from agentloop.envs.db import DBExpertConfig, DBTask, SQLEnv, SQLEnvConfig, load_db_tasks
from agentloop.envs.db.engine import quote_identifier
from agentloop.envs.db.experts import gold_actions, recovery_actions
from agentloop.envs.db.gold import canonical_sql, mistaken_sql
from agentloop.envs.experts import replay_actions


@pytest.fixture(scope="module")
def train_tasks(data_dir: Path) -> list[DBTask]:
    return load_db_tasks(data_dir, "train")


@pytest.fixture(scope="module")
def train_experts(train_tasks: list[DBTask]) -> tuple[list, dict[str, Any]]:
    return build_experts("db", train_tasks, SQLEnvConfig(), DBExpertConfig(recovery_fraction=0.25), seed=0)


def sql_of(action: str) -> str:
    return action.split("```sql\n", 1)[1].split("\n```", 1)[0]


def test_replay_records_a_real_episode(train_tasks: list[DBTask]) -> None:
    env = SQLEnv(train_tasks[:1], SQLEnvConfig())
    actions = ["I will look.", 'Action: Operation\n```sql\nSELECT "Notes" FROM "Jiu-Jitsu Championships Results";\n```']
    demo = replay_actions(env, "train-0000", [*actions, 'Action: Answer\nFinal Answer: ["Women +60kg Bronze"]'])
    assert [m.role for m in demo.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert demo.messages[2].content.startswith("Invalid action")
    assert demo.messages[4].content.startswith("[('Female Purple Belt Final',)")
    assert (demo.reward, demo.success, demo.terminated, demo.truncated) == (1.0, True, True, False)
    assert (demo.num_turns, demo.invalid_actions, demo.source, demo.policy_version) == (3, 1, "expert", -1)
    assert (demo.iteration, demo.tokenizer, demo.task.task_id) == (0, "", "train-0000")
    assert all(m.token_ids == () for m in demo.messages)


def test_replay_rejects_actions_after_the_end(train_tasks: list[DBTask]) -> None:
    env = SQLEnv(train_tasks[:1], SQLEnvConfig())
    with pytest.raises(ValueError, match="ended after 1 of 2 actions"):
        replay_actions(env, "train-0000", ["Action: Answer\nFinal Answer: []", "Action: Answer\nFinal Answer: []"])


def test_canonical_sql_quotes_every_name_and_repairs_the_gold(train_tasks: list[DBTask]) -> None:
    bare = train_tasks[51]  # gold: SELECT Player FROM Cricket Bowling Statistics WHERE Runs = 276 ...
    assert canonical_sql(bare).startswith('SELECT "Player" FROM "Cricket Bowling Statistics" WHERE "Runs" = 276')
    glued = train_tasks[93]  # gold: SELECT AVG(Laps) AS average_lapsFROM Race ResultsWHERE Car = '8';
    assert canonical_sql(glued) == 'SELECT AVG("Laps") AS "average_laps" FROM "Race Results" WHERE "Car" = \'8\''
    renamed = train_tasks[1]  # gold names the table Tournament_Results
    assert 'FROM "Tournament Results"' in canonical_sql(renamed)
    for task in train_tasks[:120]:
        sql = canonical_sql(task)
        if sql is not None:
            identifiers = list(sqlglot.parse_one(sql, read="sqlite").find_all(exp.Identifier))
            assert identifiers and all(i.quoted for i in identifiers), sql


def test_gold_actions_use_the_policy_format(train_tasks: list[DBTask]) -> None:
    select = gold_actions(train_tasks[0])
    assert select == [
        "Action: Operation\n```sql\n"
        'SELECT "Notes" FROM "Jiu-Jitsu Championships Results" WHERE "Method" = \'Decision\';\n```',
        'Action: Answer\nFinal Answer: ["Women +60kg Bronze"]',
    ]
    insert = gold_actions(train_tasks[100])
    assert insert[1] == "Action: Answer\nFinal Answer: []"
    assert sql_of(insert[0]).startswith('INSERT INTO "Table of Year, Title, and Role" ("Year", "Title", "Role")')
    assert gold_actions(train_tasks[1]) is not None and gold_actions(train_tasks[5]) is not None


def test_recovery_demo_shows_a_real_error_then_the_fix(train_tasks: list[DBTask]) -> None:
    task = train_tasks[51]
    assert mistaken_sql(task).startswith("SELECT Player FROM Cricket Bowling Statistics")
    assert mistaken_sql(train_tasks[201]) is None  # nothing there needs quotes
    actions = recovery_actions(task)
    demo = replay_actions(SQLEnv([task], SQLEnvConfig()), task.task.task_id, actions)
    assert demo.messages[2].content.startswith("Error:")
    assert demo.messages[3].content == gold_actions(task)[0]
    assert demo.num_turns == 3 and demo.invalid_actions == 0


def test_train_experts_report_success_per_type(train_experts: tuple[list, dict[str, Any]]) -> None:
    demos, report = train_experts
    by_type, by_kind = report["by_type"], report["by_kind"]
    assert set(by_type) == {
        "other", "counting", "comparison", "ranking", "INSERT", "UPDATE",
        "aggregation-SUM", "aggregation-MIN", "aggregation-MAX", "aggregation-AVG",
    }  # fmt: skip
    assert {k: v["attempted"] for k, v in by_kind.items()} == {"SELECT": 100, "INSERT": 100, "UPDATE": 100}
    assert len(demos) == sum(v["succeeded"] for v in by_kind.values())
    assert by_kind["INSERT"]["succeeded"] >= 95 and by_kind["UPDATE"]["succeeded"] >= 95
    assert 40 <= by_kind["SELECT"]["succeeded"] < 100  # about half of the SELECT gold SQL is wrong
    assert all(d.reward == 1.0 and d.success and d.terminated and d.source == "expert" for d in demos)
    assert len({d.task.task_id for d in demos}) == len(demos)
    assert all(d.tamper_attempts == 0 for d in demos)
    assert report["unchanged_by_gold"] == ["train-0206"]  # WHERE Montreal misses Montréal in SQLite


def test_a_quarter_of_eligible_demos_show_recovery(train_experts: tuple[list, dict[str, Any]]) -> None:
    demos, report = train_experts
    recovery = report["recovery"]
    assert recovery["chosen"] == round(0.25 * recovery["eligible"]) > 0
    retried = [d for d in demos if d.num_turns == 3]
    assert len(retried) == recovery["kept"] == recovery["chosen"]
    assert all(d.messages[2].content.startswith("Error:") for d in retried)


def test_expert_config_validates() -> None:
    with pytest.raises(ConfigError, match="recovery_fraction"):
        DBExpertConfig(recovery_fraction=1.5).validate()


def test_reference_tables_reproduce_agentbench_md5(data_dir: Path, train_tasks: list[DBTask]) -> None:
    """The gold SQL read as MySQL leaves the table whose MD5 AgentBench recorded (all-TEXT, as upstream)."""
    entries = [json.loads(line) for line in (data_dir / "dbbench" / "standard.jsonl").read_text().splitlines()]
    agree = sum(
        mysql_table_md5(task, canonical_sql(task)) in entry["answer_md5"]
        for task, entry in zip(train_tasks, entries, strict=True)
        if task.is_write
    )
    assert agree >= 195  # 198 of 200 measured; the rest depend on MySQL's accent-insensitive collation


def mysql_table_md5(task: DBTask, sql: str) -> str:
    """AgentBench's table hash: md5 of the sorted 5-hex-digit md5 prefixes of each CONCAT_WS row."""
    conn = sqlite3.connect(":memory:")
    table = quote_identifier(task.table_name)
    conn.execute(f"CREATE TABLE {table} ({', '.join(quote_identifier(n) + ' TEXT' for n, _ in task.columns)})")
    marks = ", ".join("?" * len(task.columns))
    conn.executemany(f"INSERT INTO {table} VALUES ({marks})", [[str(v) for v in row] for row in task.rows])
    conn.execute(sql)
    rows = conn.execute(f"SELECT * FROM {table}").fetchall()
    prefixes = sorted(hashlib.md5(",".join(str(v) for v in r if v is not None).encode()).hexdigest()[:5] for r in rows)
    return hashlib.md5(",".join(prefixes).encode()).hexdigest()
