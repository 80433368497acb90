"""The Database environment on real dbbench tasks and real SQLite."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env
from hostile import PAYLOADS, RAW

from agentloop.config import ConfigError
from agentloop.envs import load_tasks, make_env, names
from agentloop.envs.db import DBTask, SQLEnv, SQLEnvConfig, load_db_tasks
from agentloop.envs.db.engine import sqlite_type
from agentloop.envs.db.scoring import answers_match, parse_answer_list

JIU_JITSU = '"Jiu-Jitsu Championships Results"'  # train-0000's table, 18 rows
YEAR_TITLE_ROLE = '"Table of Year, Title, and Role"'  # train-0100's table (INSERT)
RACING = '"car_racing_schedule"'  # train-0200's table (UPDATE)


def operation(sql: str) -> str:
    return f"Action: Operation\n```sql\n{sql}\n```"


def answer(text: str) -> str:
    return f"Action: Answer\nFinal Answer: {text}"


@pytest.fixture(scope="module")
def train_tasks(data_dir: Path) -> list[DBTask]:
    return load_db_tasks(data_dir, "train")


@pytest.fixture()
def env(train_tasks: list[DBTask]) -> SQLEnv:
    config = SQLEnvConfig(query_timeout_s=0.3)
    sql_env = SQLEnv([train_tasks[i] for i in (0, 51, 53, 100, 200)], config)
    yield sql_env
    sql_env.close()


def test_splits_load_with_ids_kinds_and_labels(data_dir: Path) -> None:
    train, dev = load_db_tasks(data_dir, "train"), load_db_tasks(data_dir, "dev")
    assert (len(train), len(dev)) == (300, 60)
    assert train[42].task.task_id == "train-0042" and dev[7].task.task_id == "dev-0007"
    assert {t.task.kind for t in train} == {"SELECT", "INSERT", "UPDATE"}
    first = train[0]
    assert (first.task.env, first.task.split, first.query_type) == ("db", "train", "other")
    assert first.label == ("Women +60kg Bronze",) and first.columns[0] == ("Result", "TEXT")
    assert train[100].label == () and train[100].gold_sql.startswith("INSERT INTO")
    assert not {t.task.instruction for t in train} & {t.task.instruction for t in dev}


def test_loading_errors_name_the_problem(tmp_path: Path, data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown dbbench split 'test'"):
        load_db_tasks(data_dir, "test")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dbbench")):
        load_db_tasks(tmp_path, "train")
    (tmp_path / "dbbench").mkdir()
    with pytest.raises(FileNotFoundError, match="dev.jsonl"):
        load_db_tasks(tmp_path, "dev")
    with pytest.raises(ValueError, match="unknown environment 'chess'; known environments: db"):
        load_tasks("chess", data_dir, "train")
    assert "db" in names()


def test_config_validation() -> None:
    SQLEnvConfig().validate()
    with pytest.raises(ConfigError, match="max_turns"):
        SQLEnvConfig(max_turns=0).validate()
    with pytest.raises(ConfigError, match="query_timeout_s"):
        SQLEnvConfig(query_timeout_s=0.0).validate()
    with pytest.raises(ConfigError, match="max_memory_mib must be at least 16"):
        SQLEnvConfig(max_memory_mib=8).validate()
    with pytest.raises(ConfigError, match=r"max_db_pages \(8192 pages of 4 KiB\) must fit in half of max_memory_mib"):
        SQLEnvConfig(max_db_pages=8192, max_memory_mib=32).validate()


def test_passes_gymnasium_check_env(env: SQLEnv) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env, skip_render_check=True)


def test_registry_makes_the_env(train_tasks: list[DBTask]) -> None:
    made = make_env("db", train_tasks[:2], SQLEnvConfig())
    assert isinstance(made, SQLEnv)
    with pytest.raises(TypeError, match="SQLEnvConfig"):
        make_env("db", train_tasks[:2], object())


def test_first_observation_gives_protocol_question_and_quoted_schema(env: SQLEnv) -> None:
    observation, info = env.reset(options={"task_id": "train-0000"})
    assert info["task"].task_id == "train-0000"
    assert "Action: Operation" in observation and "Final Answer:" in observation
    assert "Question: What are the Notes when the Method is decision?" in observation
    assert f"Table: {JIU_JITSU}" in observation and '"Notes" TEXT' in observation
    assert env.observation_space.contains(observation)


def test_select_answered_right_scores_one(env: SQLEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    # The question says "decision"; text columns compare case-insensitively, as in MySQL.
    query = f'SELECT "Notes" FROM {JIU_JITSU} WHERE "Method" = \'decision\';'
    obs, reward, terminated, truncated, info = env.step("I look up the notes.\n" + operation(query))
    assert obs == "[('Women +60kg Bronze',)]"
    assert (reward, terminated, truncated, info["invalid"], info["sql_error"]) == (0.0, False, False, False, False)
    assert info["tamper_attempts"] == 0
    obs, reward, terminated, truncated, info = env.step(answer('["Women +60kg Bronze"]'))
    assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)


def test_select_answered_wrong_scores_zero(env: SQLEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    _, reward, terminated, truncated, info = env.step(answer("['Women +60kg Silver']"))
    assert (reward, terminated, truncated, info["success"], info["invalid"]) == (0.0, True, False, False, False)


@pytest.mark.parametrize(
    ("given", "label", "match"),
    [
        (["1"], ["1.0"], True),
        ([" 2 "], ["2"], True),
        (["1,174"], ["1174.0"], True),
        ([None], ["none"], True),
        (["b", "a"], ["a", "b"], True),
        (["Paris"], ["paris"], False),
        (["x", "x"], ["x"], False),
        ([], ["x"], False),
        ([12.333333], ["12.33"], False),
    ],
)
def test_answer_matching_by_hand(given: list, label: list[str], match: bool) -> None:
    assert answers_match(given, label) is match


def test_answer_lists_parse_as_json_or_python() -> None:
    assert parse_answer_list('["a", 1]') == ["a", 1]
    assert parse_answer_list("[('Women +60kg Bronze',)]") == ["Women +60kg Bronze"]
    assert parse_answer_list("[3]\nI am done.") == [3]
    assert parse_answer_list("Women +60kg Bronze") is None
    assert parse_answer_list("{'a': 1}") is None


def test_insert_scored_by_comparing_tables(env: SQLEnv) -> None:
    row = "(2019, 'Aoharu Ride', 'Kou Mabuchi')"
    assert play(env, "train-0100", [operation(f"INSERT INTO {YEAR_TITLE_ROLE} VALUES {row};"), answer("[]")]) == 1.0
    wrong = "(2019, 'Aoharu Ride', 'Kou Mabuch')"
    assert play(env, "train-0100", [operation(f"INSERT INTO {YEAR_TITLE_ROLE} VALUES {wrong};"), answer("[]")]) == 0.0
    twice = f"INSERT INTO {YEAR_TITLE_ROLE} VALUES {row}, {row};"
    assert play(env, "train-0100", [operation(twice), answer("[]")]) == 0.0
    assert play(env, "train-0100", [answer("[]")]) == 0.0


def test_update_scored_by_comparing_tables(env: SQLEnv) -> None:
    where = "WHERE \"Race\" = 'Grand Prix of Atlanta'"
    right = f"UPDATE {RACING} SET \"Class\" = 'Formula 1', \"Circuit\" = 'Atlanta Motor Speedway' {where}"
    assert play(env, "train-0200", [operation(right), answer("done")]) == 1.0
    half = f"UPDATE {RACING} SET \"Class\" = 'Formula 1' {where}"
    assert play(env, "train-0200", [operation(half), answer("[]")]) == 0.0
    assert play(env, "train-0200", [operation(f"DROP TABLE {RACING}"), answer("[]")]) == 0.0


def play(env: SQLEnv, task_id: str, actions: list[str]) -> float:
    env.reset(options={"task_id": task_id})
    reward = 0.0
    for action in actions:
        _, reward, _, _, _ = env.step(action)
    return reward


def test_truncates_after_max_turns_and_then_needs_reset(train_tasks: list[DBTask]) -> None:
    env = SQLEnv(train_tasks[:1], SQLEnvConfig(max_turns=2))
    with pytest.raises(ResetNeeded):
        env.step(answer("[]"))
    env.reset()
    assert env.step("no action here")[1:4] == (0.0, False, False)
    _, reward, terminated, truncated, info = env.step(operation("SELECT 1;"))
    assert (reward, terminated, truncated, info["success"]) == (0.0, False, True, False)
    with pytest.raises(ResetNeeded):
        env.step(answer("[]"))


def test_malformed_actions_explain_and_cost_a_turn_but_sql_errors_are_valid(env: SQLEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    obs, _, _, _, info = env.step("Action: Operation\nSELECT 1")
    assert info["invalid"] and "```sql" in obs
    obs, _, _, _, info = env.step(operation("SELECT 1; SELECT 2;"))
    assert info["invalid"] and "one SQL statement" in obs
    obs, _, _, _, info = env.step(answer("Women +60kg Bronze"))
    assert info["invalid"] and "must be a list" in obs
    obs, _, _, truncated, info = env.step(operation("SELECT x FROM nowhere;"))
    assert obs == "Error: no such table: nowhere" and info["sql_error"] and not info["invalid"]
    assert not truncated


def test_long_output_is_capped_with_a_note(env: SQLEnv) -> None:
    env.reset(options={"task_id": "train-0053"})
    obs, *_ = env.step(operation('SELECT * FROM "Island Area by Country/Region";'))
    assert "[output truncated:" in obs and env.observation_space.contains(obs)
    obs, *_ = env.step(operation('SELECT "Rank" FROM "Island Area by Country/Region";'))
    assert obs.endswith("[only the first 50 rows are shown]")


def hostile_actions(tmp_path: Path) -> list[object]:
    """The shared corpus (raw, and each payload as an SQL operation and as an answer), plus SQL attacks."""
    t = JIU_JITSU
    shared = [*RAW, *(operation(p) for p in PAYLOADS), *(answer(p) for p in PAYLOADS)]
    return [
        *shared,
        operation("SELECT 'a\x00b';"),
        operation("SELECT 'éß漢字🙂', '\ud800';"),
        operation("SELEC * FRM everything;"),
        operation("SELECT 1; DROP TABLE " + t + ";"),
        operation(f"DROP TABLE {t};"),
        operation(f"DELETE FROM {t};"),
        operation(f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x;"),
        operation(f"VACUUM INTO '{tmp_path / 'y.db'}';"),
        operation("PRAGMA writable_schema = 1;"),
        operation("SELECT load_extension('/tmp/evil');"),
        operation("CREATE VIRTUAL TABLE v USING fts5(x);"),
        operation("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c;"),
        operation(f"SELECT count(*) FROM {t} a, {t} b, {t} c, {t} d, {t} e, {t} f, {t} g;"),
        operation("SELECT zeroblob(1000000000);"),
        operation(
            "CREATE TABLE big AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 100000000) "
            "SELECT x, printf('%.500c', 'x') AS pad FROM c;"
        ),
        operation("SELECT ?;"),
        answer("[" * 3000),
    ]


def test_hostile_actions_become_observations_and_change_nothing_outside(env: SQLEnv, tmp_path: Path) -> None:
    for action in hostile_actions(tmp_path):
        env.reset(options={"task_id": "train-0000"})
        obs, reward, terminated, truncated, info = env.step(action)
        assert isinstance(obs, str) and env.observation_space.contains(obs), repr(action)[:80]
        assert reward == 0.0 and not info["success"] and info["tamper_attempts"] in (0, 1)
        if not (terminated or truncated):
            env.step(answer('["Women +60kg Bronze"]'))
        assert fresh_table_is_intact(env)
    assert list(tmp_path.iterdir()) == []


def test_dropping_the_table_is_refused_and_counted_and_a_right_answer_still_scores(env: SQLEnv) -> None:
    env.reset(options={"task_id": "train-0000"})
    obs, _, _, _, info = env.step(operation(f"DROP TABLE {JIU_JITSU};"))
    assert obs.startswith("Error: changing the schema") and info["tamper_attempts"] == 1
    assert env.step(answer('["Women +60kg Bronze"]'))[1] == 1.0
    assert fresh_table_is_intact(env)


def fresh_table_is_intact(env: SQLEnv) -> bool:
    env.reset(options={"task_id": "train-0000"})
    count, *_ = env.step(operation(f"SELECT count(*) FROM {JIU_JITSU};"))
    schema, *_ = env.step(operation("SELECT type, name FROM sqlite_master;"))
    return count == "[(18,)]" and schema == "[('table', 'Jiu-Jitsu Championships Results')]"


def test_reset_is_seeded_and_rejects_unknown_tasks(env: SQLEnv) -> None:
    first = [env.reset(seed=7)[1]["task"].task_id] + [env.reset()[1]["task"].task_id for _ in range(5)]
    again = [env.reset(seed=7)[1]["task"].task_id] + [env.reset()[1]["task"].task_id for _ in range(5)]
    assert first == again
    with pytest.raises(KeyError, match="train-0299"):
        env.reset(options={"task_id": "train-0299"})


@pytest.mark.parametrize(
    ("declared", "sqlite"),
    [("INT", "INTEGER"), ("year", "INTEGER"), ("DECIMAL(6,3)", "NUMERIC"), ("FLOAT", "REAL"), ("STRING", "TEXT")],
)
def test_declared_types_map_to_affinities(declared: str, sqlite: str) -> None:
    assert sqlite_type(declared).split()[0] == sqlite
