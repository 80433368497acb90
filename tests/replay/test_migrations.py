"""Schema migrations of the replay store, on real SQLite files and a throwaway PostgreSQL server.

A schema-1 database is built here the way every run directory made before schema 2 holds one:
the tables of today's DDL as the store created it then, ``meta.schema_version = '1'``, no
``alembic_version`` table, WAL journal on SQLite; then some trajectories, a pair and two
completed stages.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import IntegrityError
from test_store import INSERT, REPO, SELECT, cut, episode

from agentloop.replay import ReplayStore, SchemaVersionError, migrations
from agentloop.replay.store import SCHEMA_LOCK
from agentloop.replay.tables import SCHEMA_VERSION
from agentloop.types import Experience, Pair, Proposal, Trajectory

SCHEMA_1 = """
CREATE TABLE meta ("key" VARCHAR NOT NULL, value VARCHAR NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE trajectories (
    id {serial} NOT NULL, env VARCHAR NOT NULL, task_id VARCHAR NOT NULL, split VARCHAR NOT NULL,
    kind VARCHAR NOT NULL, instruction TEXT NOT NULL, source VARCHAR NOT NULL,
    policy_version INTEGER NOT NULL, iteration INTEGER NOT NULL, stage VARCHAR NOT NULL,
    reward {double} NOT NULL, success BOOLEAN NOT NULL, terminated BOOLEAN NOT NULL,
    truncated BOOLEAN NOT NULL, num_turns INTEGER NOT NULL, invalid_actions INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL, tokenizer VARCHAR NOT NULL, messages JSON NOT NULL,
    created_at {timestamp} NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_trajectories_source CHECK (source IN ('expert', 'explore', 'eval')),
    CONSTRAINT ck_trajectories_turns CHECK (num_turns >= 0 AND invalid_actions >= 0)
);
CREATE INDEX ix_trajectories_stage ON trajectories (stage);
CREATE INDEX ix_trajectories_iteration_source ON trajectories (iteration, source);
CREATE INDEX ix_trajectories_env_task ON trajectories (env, task_id);
CREATE TABLE stages (
    name VARCHAR NOT NULL, position INTEGER NOT NULL, completed_at {timestamp} NOT NULL,
    metrics JSON NOT NULL, PRIMARY KEY (name), UNIQUE (position)
);
CREATE TABLE pairs (
    id {serial} NOT NULL, iteration INTEGER NOT NULL, stage VARCHAR NOT NULL, env VARCHAR NOT NULL,
    task_id VARCHAR NOT NULL, chosen_id INTEGER NOT NULL, rejected_id INTEGER NOT NULL,
    rejected_num_messages INTEGER NOT NULL, rejected_num_turns INTEGER NOT NULL,
    rejected_terminated BOOLEAN NOT NULL, rejected_truncated BOOLEAN NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(chosen_id) REFERENCES trajectories (id),
    FOREIGN KEY(rejected_id) REFERENCES trajectories (id)
);
CREATE INDEX ix_pairs_iteration ON pairs (iteration)
"""
"""The schema-1 DDL the store emitted (SQLAlchemy's ``create_all`` of the schema-1 tables)."""
SCHEMA_1_TYPES = {
    "sqlite": {"serial": "INTEGER", "double": "DOUBLE", "timestamp": "DATETIME"},
    "postgresql": {"serial": "SERIAL", "double": "DOUBLE PRECISION", "timestamp": "TIMESTAMP WITH TIME ZONE"},
}


def schema_1_era(t: Trajectory) -> Trajectory:
    """A trajectory as a schema-1 store held it: turns recorded no log-probs or versions yet
    (those live in the messages' JSON, so reading them needs no migration)."""
    return replace(t, messages=tuple(replace(m, logprobs=(), policy_version=None) for m in t.messages))


EXPERT = episode(SELECT, source="expert", policy_version=-1, iteration=0, seed=1)
FAILED = schema_1_era(episode(SELECT, turns=3, success=False, seed=2))
SOLVED = schema_1_era(episode(INSERT, seed=3))
STORED = {"experts": [EXPERT], "explore/1": [FAILED, SOLVED]}
PAIR = Pair(SELECT, EXPERT, cut(FAILED, 1), iteration=1)
METRICS = {"experts": {}, "explore/1": {"explore/success_rate": 0.5}}


def schema_1_row(t: Trajectory, stage: str) -> dict[str, Any]:
    """A ``trajectories`` row of schema 1."""
    return {
        "env": t.task.env,
        "task_id": t.task.task_id,
        "split": t.task.split,
        "kind": t.task.kind,
        "instruction": t.task.instruction,
        "source": t.source,
        "policy_version": t.policy_version,
        "iteration": t.iteration,
        "stage": stage,
        "reward": t.reward,
        "success": t.success,
        "terminated": t.terminated,
        "truncated": t.truncated,
        "num_turns": t.num_turns,
        "invalid_actions": t.invalid_actions,
        "generated_tokens": t.generated_tokens,
        "tokenizer": t.tokenizer,
        "messages": [{"role": m.role, "content": m.content, "token_ids": list(m.token_ids)} for m in t.messages],
        "created_at": datetime.now(UTC),
    }


def engine_of(url: str) -> Engine:
    """An engine on ``url``, a SQLite file's directory created."""
    database = make_url(url).database
    if url.startswith("sqlite") and database:
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    return create_engine(url)


def build_schema_1(url: str) -> None:
    """Fills an empty database as the schema-1 store left it, rows included."""
    engine = engine_of(url)
    try:
        with engine.begin() as connection:
            if engine.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA journal_mode=WAL")
            for statement in SCHEMA_1.format(**SCHEMA_1_TYPES[engine.dialect.name]).split(";"):
                connection.exec_driver_sql(statement)
            _insert_schema_1_rows(connection)
    finally:
        engine.dispose()


def _insert_schema_1_rows(connection: Connection) -> None:
    tables = MetaData()
    tables.reflect(connection)
    trajectories, pairs = tables.tables["trajectories"], tables.tables["pairs"]
    connection.execute(tables.tables["meta"].insert().values(key="schema_version", value="1"))
    ids = {}
    for stage, batch in STORED.items():
        for t in batch:
            ids[t] = connection.execute(trajectories.insert().values(schema_1_row(t, stage))).inserted_primary_key[0]
    pair = {"iteration": 1, "stage": "explore/1", "env": "db", "task_id": SELECT.task_id}
    pair |= {"chosen_id": ids[EXPERT], "rejected_id": ids[FAILED], "rejected_num_messages": 2}
    pair |= {"rejected_num_turns": 1, "rejected_terminated": False, "rejected_truncated": True}
    connection.execute(pairs.insert().values(pair))
    for position, (stage, metrics) in enumerate(METRICS.items(), start=1):
        values = {"name": stage, "position": position, "completed_at": datetime.now(UTC), "metrics": metrics}
        connection.execute(tables.tables["stages"].insert().values(values))


@pytest.fixture
def schema_1_url(store_url: str) -> str:
    """A schema-1 database holding :data:`STORED`, :data:`PAIR` and the stages of :data:`METRICS`."""
    build_schema_1(store_url)
    return store_url


def layout(url: str) -> dict[str, dict[str, list[Any]]]:
    """Every table as the database reports it: columns, keys, indexes and checks."""
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        return {table: _table_layout(inspector, table) for table in inspector.get_table_names()}
    finally:
        engine.dispose()


def _table_layout(inspector: Any, table: str) -> dict[str, list[Any]]:
    columns, keys = inspector.get_columns(table), inspector.get_foreign_keys(table)
    checks, indexes = inspector.get_check_constraints(table), inspector.get_indexes(table)
    return {
        "columns": sorted((c["name"], str(c["type"]), c["nullable"], c["default"]) for c in columns),
        "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
        "foreign_keys": sorted((k["constrained_columns"], k["referred_table"], k["referred_columns"]) for k in keys),
        "indexes": sorted((i["name"], i["column_names"], i["unique"]) for i in indexes),
        "unique": sorted(u["column_names"] for u in inspector.get_unique_constraints(table)),
        "checks": sorted((c["name"], " ".join(c["sqltext"].split())) for c in checks),
    }


def scalars(url: str, query: str) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(text(query)))
    finally:
        engine.dispose()


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine executes while the test runs."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    yield seen
    event.remove(Engine, "before_cursor_execute", record)


def migration_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "agentloop.replay.store" and " migrated from schema " in r.getMessage()
    ]


def test_revisions_are_numbered_by_schema_version() -> None:
    script = ScriptDirectory.from_config(migrations.config())
    assert script.get_heads() == [migrations.revision(SCHEMA_VERSION)] == ["0006"]
    chain = [(r.revision, r.down_revision) for r in script.walk_revisions()]
    assert chain == [(f"{n:04d}", f"{n - 1:04d}" if n > 1 else None) for n in range(6, 0, -1)]


def test_a_new_database_is_created_at_the_current_version_and_stamped(store_url: str) -> None:
    ReplayStore(store_url).close()
    assert scalars(store_url, "SELECT version_num FROM alembic_version") == ["0006"]
    assert scalars(store_url, "SELECT value FROM meta WHERE key = 'schema_version'") == ["6"]


def test_revision_0001_builds_schema_1(store_url: str, other_store_url: str) -> None:
    engine = engine_of(store_url)
    try:
        with engine.begin() as connection:
            command.upgrade(migrations.config(connection), "0001")
    finally:
        engine.dispose()
    build_schema_1(other_store_url)
    built = layout(store_url)
    assert built.pop("alembic_version") and built == layout(other_store_url)
    assert scalars(store_url, "SELECT value FROM meta") == ["1"]


def test_a_schema_1_database_is_migrated_keeping_every_row(schema_1_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        store = ReplayStore(schema_1_url)
    with store:
        assert migration_lines(caplog) == [f"replay store {schema_1_url} migrated from schema 1 to 6"]
        assert store.trajectories() == [EXPERT, FAILED, SOLVED]
        assert [t.tamper_attempts for t in store.trajectories()] == [0, 0, 0]
        assert store.pairs() == [PAIR]
        assert store.completed_stages() == ["experts", "explore/1"]
        assert store.stage_metrics("explore/1") == {"explore/success_rate": 0.5}
        tampered = episode(INSERT, tamper=3, iteration=2, seed=4)
        store.commit_stage("explore/2", trajectories=[tampered], metrics={})
        assert store.trajectories(stage="explore/2") == [tampered]
        with pytest.raises(IntegrityError, match="ck_trajectories_tamper_attempts"):
            store.add([episode(INSERT, tamper=-1)], stage="explore/3")
        # Schema 3: streamed episodes are unique within their stage; the rows from before hold no key.
        store.add_episodes([episode(SELECT, seed=5), episode(INSERT, seed=6)], stage="eval/1")
        with pytest.raises(ValueError, match="stored already"):
            store.add_episodes([episode(INSERT, seed=7)], stage="eval/1")
        assert store.episodes("eval/1") == {"db/train-1", "db/train-2"} and store.episodes("explore/1") == set()
        # Schema 4: the rows from before are first trials without memory; trials and experiences store.
        assert {(t.trial, t.memory, t.reflection) for t in store.trajectories()} == {(0, "", "")}
        later = replace(episode(SELECT, seed=8), trial=2, memory="earlier: ...", reflection="try a WHERE")
        lesson = Experience(later.task, False, 0.0, "try a WHERE", ("Action: ...",), stage="explore/4", trial=2)
        store.add_episodes([later], stage="explore/4", experiences=[lesson])
        assert store.trajectories(stage="explore/4") == [later] and store.experiences() == [lesson]
        assert store.episodes("explore/4") == {"db/train-1#2"}
        # Schema 5: a proposal keeps its judge's verdict (None: not judged).
        judged = [
            Proposal("db", "train-1", f"imagine-5-{i}", "Question: ...", "imagine/5", True, "", v)
            for i, v in enumerate((True, False, None))
        ]
        store.commit_stage("imagine/5", metrics={}, proposals=judged)
        assert store.proposals() == judged
    # Schema 6: what references a trajectory is indexed.
    engine = engine_of(schema_1_url)
    try:
        indexes = {table: {i["name"] for i in inspect(engine).get_indexes(table)} for table in ("pairs", "experiences")}
    finally:
        engine.dispose()
    assert {"ix_pairs_chosen_id", "ix_pairs_rejected_id"} <= indexes["pairs"]
    assert "ix_experiences_trajectory_id" in indexes["experiences"]
    assert scalars(schema_1_url, "SELECT version_num FROM alembic_version") == ["0006"]
    assert scalars(schema_1_url, "SELECT value FROM meta WHERE key = 'schema_version'") == ["6"]


def test_a_migrated_database_has_the_layout_of_a_new_one(schema_1_url: str, other_store_url: str) -> None:
    ReplayStore(schema_1_url).close()
    ReplayStore(other_store_url).close()
    assert layout(schema_1_url) == layout(other_store_url)


def test_reopening_a_migrated_database_only_reads_its_version(
    schema_1_url: str, caplog: pytest.LogCaptureFixture, statements: list[str]
) -> None:
    ReplayStore(schema_1_url).close()
    statements.clear()
    with caplog.at_level(logging.INFO):
        ReplayStore(schema_1_url).close()
    assert migration_lines(caplog) == []
    writes = [s for s in statements if re.match(r"\s*(CREATE|ALTER|DROP|INSERT|UPDATE|DELETE|BEGIN)", s, re.I)]
    assert statements and writes == []
    # Not even Alembic is imported for a database at the current version.
    script = f"import sys, agentloop.replay as r; r.ReplayStore({schema_1_url!r}); print('alembic' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


class InjectedFault(RuntimeError):
    """Raised from inside a migration by the test."""


def test_a_failed_migration_leaves_schema_1_as_it_was(schema_1_url: str) -> None:
    before = layout(schema_1_url)

    def fail_at_the_end(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE ALEMBIC_VERSION"):  # after every change of 0002
            raise InjectedFault(statement)

    event.listen(Engine, "before_cursor_execute", fail_at_the_end)
    try:
        with pytest.raises(InjectedFault):
            ReplayStore(schema_1_url)
    finally:
        event.remove(Engine, "before_cursor_execute", fail_at_the_end)

    assert layout(schema_1_url) == before  # no new column, no alembic_version, no batch-mode leftovers
    assert "alembic_version" not in before
    assert scalars(schema_1_url, "SELECT value FROM meta") == ["1"]
    with ReplayStore(schema_1_url) as store:
        assert store.trajectories() == [EXPERT, FAILED, SOLVED] and store.pairs() == [PAIR]


def test_two_openers_of_an_old_database_migrate_it_once(schema_1_url: str, caplog: pytest.LogCaptureFixture) -> None:
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            ReplayStore(schema_1_url).close()
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    openers = [threading.Thread(target=open_store) for _ in range(2)]
    with caplog.at_level(logging.INFO):
        with schema_lock_held(schema_1_url):
            for opener in openers:
                opener.start()
            for opener in openers:
                opener.join(timeout=1.0)
            assert all(opener.is_alive() for opener in openers)  # both read version 1, both wait for the lock
        for opener in openers:
            opener.join(timeout=60)
    assert errors == [] and not any(opener.is_alive() for opener in openers)
    assert len(migration_lines(caplog)) == 1
    with ReplayStore(schema_1_url) as store:
        assert store.trajectories() == [EXPERT, FAILED, SOLVED] and store.pairs() == [PAIR]


@contextmanager
def schema_lock_held(url: str) -> Iterator[None]:
    """Holds the lock schema work takes: SQLite's write lock, or the PostgreSQL advisory lock."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                connection.execution_options(isolation_level="AUTOCOMMIT")
                connection.exec_driver_sql("BEGIN IMMEDIATE")
                yield
                connection.exec_driver_sql("COMMIT")
            else:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK})
                yield
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK})
    finally:
        engine.dispose()


@pytest.mark.parametrize("version", [str(SCHEMA_VERSION + 1), "12"])
def test_a_newer_database_is_refused_untouched(store_url: str, version: str) -> None:
    ReplayStore(store_url).close()
    engine = create_engine(store_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE meta SET value = :v WHERE key = 'schema_version'"), {"v": version})
        connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": f"{int(version):04d}"})
    engine.dispose()
    before = layout(store_url)
    with pytest.raises(SchemaVersionError, match=f"version {version}, newer than this code's {SCHEMA_VERSION}"):
        ReplayStore(store_url)
    assert layout(store_url) == before
    assert scalars(store_url, "SELECT value FROM meta") == [version]
