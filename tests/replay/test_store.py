"""The replay store against real databases: SQLite files and a throwaway PostgreSQL server."""

from __future__ import annotations

import math
import pickle
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError

from agentloop.learners.data import build_pairs
from agentloop.metrics import trajectory_metrics
from agentloop.replay import GroupMetrics, ReplayStore, SchemaVersionError
from agentloop.types import Experience, Message, Pair, Proposal, Task, Trajectory

REPO = Path(__file__).resolve().parents[2]

SELECT = Task(env="db", task_id="train-1", split="train", kind="SELECT", instruction="How many 'rows'?\nCount them.")
INSERT = Task(env="db", task_id="train-2", split="train", kind="INSERT", instruction="Add a row.")
DEV = Task(env="db", task_id="dev-1", split="dev", kind="SELECT", instruction="Which year?")
KITCHEN = Task(env="alfworld", task_id="pick-1", split="train", kind="pick_and_place", instruction="Put a mug away.")


def episode(
    task: Task,
    *,
    turns: int = 2,
    success: bool = True,
    reward: float | None = None,
    invalid: int = 0,
    tamper: int = 0,
    source: str = "explore",
    iteration: int = 1,
    policy_version: int = 1,
    seed: int = 0,
) -> Trajectory:
    """A trajectory with ``turns`` assistant turns, each after a user turn, and distinct token ids."""
    messages: list[Message] = []
    for turn in range(turns):
        ids = tuple(range(seed * 1000 + turn * 10, seed * 1000 + turn * 10 + 3))
        messages.append(Message("user", f'Observation {turn}: «ok» "quoted"\n', ids))
        generated = (262_143, *ids)
        logprobs = tuple(-0.1 * (turn + k) - 1e-7 for k in range(len(generated))) if source != "expert" else ()
        version = policy_version if source != "expert" else None
        text = f"Action: Operation\n```sql\nSELECT {turn};\n```"
        messages.append(Message("assistant", text, generated, logprobs, version))
    return Trajectory(
        task=task,
        messages=tuple(messages),
        tokenizer="tiny-bpe/gemma",
        reward=float(success) if reward is None else reward,
        success=success,
        terminated=success,
        truncated=not success,
        num_turns=turns,
        invalid_actions=invalid,
        source=source,  # type: ignore[arg-type]
        policy_version=policy_version,
        iteration=iteration,
        generated_tokens=4 * turns,
        tamper_attempts=tamper,
    )


def cut(trajectory: Trajectory, turns: int) -> Trajectory:
    """The first ``turns`` user/assistant rounds, ended by the turn budget (as ETO cuts failures)."""
    messages = trajectory.messages[: 2 * turns]
    return replace(trajectory, messages=messages, num_turns=turns, terminated=False, truncated=True)


@pytest.fixture
def store(store_url: str) -> Iterator[ReplayStore]:
    replay = ReplayStore(store_url)
    yield replay
    replay.close()


def test_round_trip_reproduces_records_exactly(store: ReplayStore) -> None:
    batch = [
        episode(SELECT, turns=3, reward=0.1 + 0.2, success=False, tamper=2),
        episode(INSERT, source="expert", policy_version=-1, iteration=0, seed=1),
        replace(episode(KITCHEN, seed=2), messages=(Message("user", "You are in a kitchen."),)),
    ]
    ids = store.add(batch, stage="explore/1")
    assert len(ids) == 3 and ids == sorted(ids)
    assert store.trajectories() == batch
    assert [t.tamper_attempts for t in store.trajectories()] == [2, 0, 0]
    assert store.trajectories()[0].token_ids == batch[0].token_ids
    assert store.trajectories()[0].messages[1].logprobs == batch[0].messages[1].logprobs != ()  # exact floats
    assert {m.policy_version for m in store.trajectories()[1].messages} == {None}  # an expert's turns


def test_negative_tamper_attempts_are_refused(store: ReplayStore) -> None:
    with pytest.raises(IntegrityError, match="ck_trajectories_tamper_attempts"):
        store.add([episode(SELECT, tamper=-1)], stage="explore/1")
    assert store.trajectories() == []


def test_add_is_all_or_nothing(store: ReplayStore) -> None:
    bad = replace(episode(INSERT), source="bogus")
    with pytest.raises(IntegrityError):
        store.add([episode(SELECT), bad, episode(DEV)], stage="explore/1")
    assert store.trajectories() == []


def test_commit_stage_stores_trajectories_pairs_and_metrics(store: ReplayStore) -> None:
    explored = [episode(SELECT, success=False, turns=4), episode(INSERT, success=False, seed=1)]
    expert = episode(SELECT, source="expert", policy_version=-1, iteration=0, seed=2)
    expert_insert = episode(INSERT, source="expert", policy_version=-1, iteration=0, seed=3)
    pairs = [Pair(SELECT, expert, cut(explored[0], 2), 1), Pair(INSERT, expert_insert, explored[1], 1)]
    metrics = {"explore/success_rate": 0.0, "dpo/loss": math.nan, "timing/explore": 12.5}

    store.commit_stage("explore/1", trajectories=explored, pairs=pairs, metrics=metrics)

    assert store.completed_stages() == ["explore/1"]
    assert store.pairs() == pairs
    assert store.pairs(iteration=1) == pairs and store.pairs(iteration=2) == []
    stored = store.stage_metrics("explore/1")
    assert math.isnan(stored.pop("dpo/loss"))
    assert stored == {"explore/success_rate": 0.0, "timing/explore": 12.5}
    # The experts were new, so they were stored with the stage; the cut kept its full trajectory.
    assert store.trajectories(source="explore") == explored
    assert store.trajectories(source="expert") == [expert, expert_insert]


def test_pairs_reuse_trajectories_of_earlier_stages(store: ReplayStore) -> None:
    expert = episode(SELECT, source="expert", policy_version=-1, iteration=0, seed=2)
    store.commit_stage("expert", trajectories=[expert], metrics={})
    store.add([episode(SELECT, success=False)], stage="explore/1")
    store.commit_stage("explore/1", trajectories=[episode(SELECT, success=False, seed=5)], metrics={})
    failed = store.trajectories(source="explore")
    pairs = [Pair(SELECT, expert, failed[0], iteration=1), Pair(SELECT, expert, cut(failed[1], 1), iteration=1)]

    store.commit_stage("pairs/1", pairs=pairs, metrics={"pairs/built": 2})

    assert store.pairs() == pairs
    assert store.counts(by=("stage",)) == {("expert",): 1, ("explore/1",): 2}


def test_pairs_from_the_eto_pair_builder_round_trip(store: ReplayStore) -> None:
    experts = [episode(task, turns=1, source="expert", policy_version=-1, iteration=0) for task in (SELECT, INSERT)]
    explored = [episode(SELECT, turns=8, success=False, seed=1), episode(INSERT, turns=1, seed=2)]
    store.commit_stage("experts", trajectories=experts, metrics={})
    store.commit_stage("explore/1", trajectories=explored, metrics={})
    pairs = build_pairs(store.trajectories(stage="experts"), store.trajectories(stage="explore/1"), iteration=1)
    assert pairs[0].rejected.num_turns == 6 < explored[0].num_turns  # cut to the expert's turns + 5

    store.commit_stage("dpo/1", pairs=pairs, metrics={})

    assert store.pairs(iteration=1) == pairs
    assert store.counts(by=("stage",)) == {("experts",): 2, ("explore/1",): 2}


def test_a_pair_trajectory_that_is_no_cut_is_stored_anew(store: ReplayStore) -> None:
    expert = episode(SELECT, source="expert", policy_version=-1, iteration=0, seed=2)
    failed = episode(SELECT, turns=3, success=False)
    store.commit_stage("explore/1", trajectories=[expert, failed], metrics={})
    rescored = replace(cut(failed, 1), reward=0.25)  # a cut changes only messages and the end state

    store.commit_stage("dpo/1", pairs=[Pair(SELECT, expert, rescored, 1)], metrics={})

    assert store.pairs() == [Pair(SELECT, expert, rescored, 1)]
    assert store.trajectories(stage="dpo/1") == [rescored]


def test_failed_commit_stage_leaves_no_trace(store: ReplayStore) -> None:
    store.commit_stage("eval/base", trajectories=[episode(DEV)], metrics={})
    # The new "expert" breaks the source check only after the stage's trajectories were written.
    broken_expert = replace(episode(SELECT, seed=2), source="bogus")
    explored = episode(SELECT, success=False)
    with pytest.raises(IntegrityError):
        store.commit_stage(
            "explore/1",
            trajectories=[explored, episode(INSERT)],
            pairs=[Pair(SELECT, broken_expert, explored, iteration=1)],
            metrics={},
        )
    assert store.completed_stages() == ["eval/base"]
    assert store.trajectories() == [episode(DEV)]
    assert store.pairs() == []


def test_process_killed_before_commit_leaves_stage_absent(store_url: str, tmp_path: Path) -> None:
    with ReplayStore(store_url) as store:
        store.commit_stage("eval/base", trajectories=[episode(DEV)], metrics={"eval/success_rate": 1.0})
    explored = [episode(SELECT, success=False), episode(INSERT)]
    expert = episode(SELECT, source="expert", policy_version=-1, iteration=0, seed=2)
    records = tmp_path / "records.pkl"
    records.write_bytes(pickle.dumps((explored, [Pair(SELECT, expert, explored[0], iteration=1)])))
    script = textwrap.dedent(
        f"""
        import os, pickle
        from sqlalchemy import event
        from sqlalchemy.orm import Session
        from agentloop.replay import ReplayStore
        from agentloop.replay.tables import StageRow

        store = ReplayStore({store_url!r})
        explored, pairs = pickle.loads(open({str(records)!r}, "rb").read())

        def die_before_commit(session, context):
            if any(isinstance(row, StageRow) for row in session.new):
                os._exit(3)  # everything is flushed, nothing is committed

        event.listen(Session, "after_flush", die_before_commit)
        store.commit_stage("explore/1", trajectories=explored, pairs=pairs, metrics={{}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr

    with ReplayStore(store_url) as store:
        assert store.completed_stages() == ["eval/base"]
        assert store.trajectories() == [episode(DEV)]
        assert store.pairs() == []
        store.commit_stage("explore/1", trajectories=explored, metrics={})
        assert store.completed_stages() == ["eval/base", "explore/1"]


def test_discard_incomplete_removes_only_unfinished_stages(store: ReplayStore) -> None:
    store.commit_stage("eval/base", trajectories=[episode(DEV)], metrics={})
    store.add([episode(SELECT), episode(INSERT)], stage="explore/1")
    assert store.discard_incomplete() == 2
    assert store.trajectories() == [episode(DEV)]
    assert store.discard_incomplete() == 0


def test_stages_complete_once_in_order(store: ReplayStore) -> None:
    for stage in ["eval/base", "sft", "explore/1", "dpo/1", "eval/eto-1"]:
        store.commit_stage(stage, metrics={"timing/stage": 1.0})
    assert store.completed_stages() == ["eval/base", "sft", "explore/1", "dpo/1", "eval/eto-1"]
    with pytest.raises(ValueError, match="already complete"):
        store.commit_stage("sft", metrics={})
    with pytest.raises(ValueError, match="already complete"):
        store.add([episode(SELECT)], stage="sft")
    with pytest.raises(KeyError):
        store.stage_metrics("explore/2")


def test_pair_of_mixed_tasks_is_refused(store: ReplayStore) -> None:
    with pytest.raises(ValueError, match="another task"):
        store.commit_stage("pairs/1", pairs=[Pair(SELECT, episode(SELECT), episode(INSERT), 1)], metrics={})
    assert store.completed_stages() == [] and store.trajectories() == []


STAGED = {
    "eval/base": [
        episode(DEV, success=False, reward=0.0, turns=2, invalid=1, iteration=0, policy_version=0, source="eval"),
        episode(KITCHEN, success=True, turns=3, tamper=2, iteration=0, policy_version=0, source="eval", seed=1),
    ],
    "explore/1": [
        episode(SELECT, success=True, turns=1, seed=2),
        episode(SELECT, success=False, reward=0.5, turns=4, invalid=2, tamper=3, seed=3),
        episode(INSERT, success=False, reward=0.0, turns=3, invalid=3, tamper=1, seed=4),
        episode(INSERT, source="expert", policy_version=-1, iteration=0, seed=5),
    ],
}
FILTERS = [
    ("env", "alfworld", lambda t, s: t.task.env == "alfworld"),
    ("task_id", "train-1", lambda t, s: t.task.task_id == "train-1"),
    ("split", "dev", lambda t, s: t.task.split == "dev"),
    ("kind", "INSERT", lambda t, s: t.task.kind == "INSERT"),
    ("source", "expert", lambda t, s: t.source == "expert"),
    ("iteration", 0, lambda t, s: t.iteration == 0),
    ("stage", "explore/1", lambda t, s: s == "explore/1"),
    ("success", False, lambda t, s: not t.success),
    ("policy_version", 1, lambda t, s: t.policy_version == 1),
]


@pytest.fixture
def staged(store: ReplayStore) -> ReplayStore:
    for stage, batch in STAGED.items():
        store.commit_stage(stage, trajectories=batch, metrics={})
    return store


@pytest.mark.parametrize(("name", "value", "keep"), FILTERS, ids=[f[0] for f in FILTERS])
def test_query_by_each_filter(staged: ReplayStore, name: str, value: object, keep: object) -> None:
    expected = [t for stage, batch in STAGED.items() for t in batch if keep(t, stage)]  # type: ignore[operator]
    assert expected and len(expected) < 6
    assert staged.trajectories(**{name: value}) == expected  # type: ignore[misc]


def test_query_combines_filters_and_limits(staged: ReplayStore) -> None:
    assert staged.trajectories(stage="explore/1", success=False, kind="SELECT") == [STAGED["explore/1"][1]]
    assert staged.trajectories(env=None, limit=2) == STAGED["eval/base"]
    with pytest.raises(TypeError, match="unknown trajectory filter"):
        staged.trajectories(reward=1.0)  # type: ignore[call-arg]


def test_counts_by_group(staged: ReplayStore) -> None:
    assert staged.counts(by=()) == {(): 6}
    assert staged.counts(by=("stage", "success")) == {
        ("eval/base", False): 1,
        ("eval/base", True): 1,
        ("explore/1", False): 2,
        ("explore/1", True): 2,
    }
    assert staged.counts(by=("kind",), env="db", source="explore") == {("INSERT",): 1, ("SELECT",): 2}
    with pytest.raises(ValueError, match="cannot group by"):
        staged.counts(by=("reward",))


def test_metrics_worked_out_by_hand(staged: ReplayStore) -> None:
    metrics = staged.metrics(by=("stage", "kind"), source="explore")
    # SELECT: rewards 1.0 and 0.5, one success, turns 1 + 4, invalid 0 + 2, tamper attempts 0 + 3.
    assert metrics[("explore/1", "SELECT")] == GroupMetrics(
        episodes=2,
        successes=1,
        success_rate=0.5,
        mean_reward=0.75,
        mean_turns=2.5,
        invalid_action_rate=2 / 5,
        tamper_attempts=3,
        tampering_episodes=1,
    )
    # INSERT (the expert is filtered out): reward 0.0, 3 turns, all 3 invalid, 1 tamper attempt.
    assert metrics[("explore/1", "INSERT")] == GroupMetrics(1, 0, 0.0, 0.0, 3.0, 1.0, 1, 1)
    assert list(metrics) == [("explore/1", "INSERT"), ("explore/1", "SELECT")]
    # eval/base: 1 of 2 solved, rewards 0 and 1, turns 2 + 3, 1 invalid of 5 turns, 2 tamper attempts in one.
    assert staged.metrics()[("eval/base",)] == GroupMetrics(2, 1, 0.5, 0.5, 2.5, 0.2, 2, 1)
    # explore/1 with its expert: tamper attempts 0 + 3 + 1 + 0 in two episodes.
    assert staged.metrics(stage="explore/1")[("explore/1",)].tamper_attempts == 4
    assert staged.metrics(stage="explore/1")[("explore/1",)].tampering_episodes == 2


def test_metrics_agree_with_trajectory_metrics(staged: ReplayStore) -> None:
    batch = STAGED["explore/1"]
    group = staged.metrics(by=(), stage="explore/1")[()]
    flat = trajectory_metrics(batch, "explore")
    assert flat["explore/episodes"] == group.episodes
    assert flat["explore/success_rate"] == pytest.approx(group.success_rate)
    assert flat["explore/reward"] == pytest.approx(group.mean_reward)
    assert flat["explore/turns"] == pytest.approx(group.mean_turns)
    assert flat["explore/invalid_action_rate"] == pytest.approx(group.invalid_action_rate)
    assert flat["explore/tamper_attempts"] == group.tamper_attempts == 4
    assert flat["explore/tampering_episodes"] == group.tampering_episodes == 2


def test_schema_version_is_checked(store_url: str) -> None:
    ReplayStore(store_url).close()
    engine = create_engine(store_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE meta SET value = '0' WHERE key = 'schema_version'"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="version 0"):
        ReplayStore(store_url)


def test_sqlite_readers_proceed_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "replay.db"
    store = ReplayStore(f"sqlite:///{path}")
    store.add([episode(SELECT)], stage="explore/1")
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        assert writer.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE trajectories SET reward = 9.0")
        assert store.trajectories() == [episode(SELECT)]
        assert store.counts(by=()) == {(): 1}
        writer.execute("COMMIT")
        assert store.trajectories()[0].reward == 9.0
    finally:
        writer.close()
        store.close()


def test_streamed_episodes_are_unique_per_stage_and_survive_an_unfinished_stage(store: ReplayStore) -> None:
    store.add_episodes([episode(SELECT), episode(INSERT, seed=1)], stage="explore/1")
    with pytest.raises(ValueError, match=r"explore/1: episodes stored already: \['db/train-2'\]"):
        store.add_episodes([episode(DEV, seed=2), episode(INSERT, seed=3)], stage="explore/1")  # all or none
    with pytest.raises(IntegrityError, match="ck_trajectories_tamper_attempts"):  # not mistaken for a duplicate
        store.add_episodes([episode(KITCHEN, tamper=-1)], stage="explore/1")
    with pytest.raises(ValueError, match="same episode twice"):
        store.add_episodes([episode(DEV), episode(DEV, seed=1)], stage="explore/1")
    assert store.episodes("explore/1") == {"db/train-1", "db/train-2"}
    store.add_episodes([episode(SELECT)], stage="eval/1")  # the same task in another stage is another episode
    store.add([episode(KITCHEN)], stage="explore/1")  # not streamed: no key
    assert store.started_stages() == ["eval/1", "explore/1"]
    assert store.discard_incomplete() == 1  # the unkeyed row goes, the streamed episodes stay
    assert len(store.trajectories(stage="explore/1")) == 2
    store.commit_stage("explore/1", trajectories=[episode(DEV)], metrics={})
    assert store.started_stages() == ["eval/1"]
    with pytest.raises(ValueError, match="complete"):
        store.add_episodes([episode(KITCHEN)], stage="explore/1")


def test_a_stage_beginning_is_recorded_for_watchers_and_a_complete_stage_refuses_it(store: ReplayStore) -> None:
    import json

    from sqlalchemy import select

    from agentloop.replay.tables import BEGUN, MetaRow

    store.begin_stage("eval/1", tasks=60)
    store.begin_stage("eval/1", tasks=60)  # a resumed stage begins again: one record, the newest
    store.begin_stage("sft")
    with store._engine.connect() as c:
        found = dict(c.execute(select(MetaRow.key, MetaRow.value).where(MetaRow.key.startswith(BEGUN))).all())
    assert sorted(found) == ["begun/eval/1", "begun/sft"]
    assert json.loads(found["begun/eval/1"])["tasks"] == 60 and json.loads(found["begun/sft"])["tasks"] is None
    store.commit_stage("sft", metrics={})
    with pytest.raises(ValueError, match="already complete"):
        store.begin_stage("sft")
    assert store.completed_stages() == ["sft"]  # a record of a beginning is not a completion


def test_truncate_keeps_the_stages_up_to_one_and_everything_they_hold(store: ReplayStore) -> None:
    from sqlalchemy import select

    from agentloop.replay.tables import BEGUN, MetaRow

    expert = episode(SELECT, source="expert", policy_version=-1, iteration=0, seed=1)
    store.commit_stage("experts", trajectories=[expert], metrics={})
    store.commit_stage("eval/sft", trajectories=[episode(DEV, seed=2)], metrics={"eval/successes": 1.0})
    failed = episode(SELECT, success=False, seed=3)
    lesson = Experience(SELECT, False, 0.0, "use COUNT", ("Action: ...",), stage="explore/1", trial=0)
    store.add_episodes([failed], stage="explore/1", experiences=[lesson])
    imagined = Proposal("db", "train-1", "imagine-1-0", "Question: ...", "explore/1", True, "", True)
    store.commit_stage("explore/1", proposals=[imagined], metrics={})
    store.commit_stage("dpo/1", pairs=[Pair(SELECT, expert, failed, 1)], metrics={})
    store.begin_stage("eval/1", tasks=1)
    store.add_episodes([episode(DEV, seed=4, iteration=1)], stage="eval/1")  # under way when the run stopped

    assert store.truncate("eval/sft") == ["explore/1", "dpo/1"]

    assert store.completed_stages() == ["experts", "eval/sft"]
    assert store.trajectories() == [expert, episode(DEV, seed=2)]
    assert store.pairs() == [] and store.experiences() == [] and store.proposals() == []
    assert store.started_stages() == [] and store.stage_metrics("eval/sft") == {"eval/successes": 1.0}
    with store._engine.connect() as c:
        assert list(c.scalars(select(MetaRow.key).where(MetaRow.key.startswith(BEGUN)))) == []
    store.commit_stage("explore/1", trajectories=[failed], metrics={})  # the stages after it run again
    with pytest.raises(KeyError, match="'dpo/1' is not a completed stage; completed: experts, eval/sft, explore/1"):
        store.truncate("dpo/1")
    assert store.truncate("explore/1") == []


def test_the_heartbeat_is_the_databases_time(store_url: str) -> None:
    import json
    from datetime import UTC, datetime

    from agentloop.replay.tables import ALIVE, database_now

    with ReplayStore(store_url) as store:
        store.beat()
        engine = create_engine(store_url)
        with engine.connect() as c:
            now = database_now(c)
            beat = json.loads(c.scalar(text("SELECT value FROM meta WHERE key = :k"), {"k": ALIVE}))
        engine.dispose()
    at = datetime.fromisoformat(beat["at"])
    assert now.tzinfo is UTC and at.utcoffset().total_seconds() == 0
    assert 0 <= (now - at).total_seconds() < 5 and abs((datetime.now(UTC) - now).total_seconds()) < 5
