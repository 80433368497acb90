"""Read-only queries of a replay store for the dashboard: aggregates in SQL, pages of rows, never a whole table.

The store is opened read-only (SQLite through a ``mode=ro`` URI and ``PRAGMA query_only``, PostgreSQL with
``default_transaction_read_only``), so the dashboard cannot change a run even by mistake. Its tables are those
of :mod:`agentloop.replay.tables`, queried directly: the store's own API returns whole trajectories, which a
page over 100,000 of them cannot afford.

A completed stage never changes (:meth:`agentloop.replay.ReplayStore.commit_stage` writes it in one
transaction and nothing deletes it), so its per-env aggregates are computed once and kept; only the
stages still running are aggregated again on each refresh.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, and_, case, create_engine, event, func, or_, select
from sqlalchemy.engine import URL, make_url

from agentloop.metrics import wilson_interval
from agentloop.replay.tables import (
    ALIVE,
    BEGUN,
    HEARTBEAT_SECONDS,
    SCHEMA_VERSION,
    ExperienceRow,
    MetaRow,
    PairRow,
    StageRow,
    TrajectoryRow,
    database_now,
)

PAGE_SIZE = 50
"""Rows per page of the trajectory and pair lists."""
STOPPED_AFTER = 4 * HEARTBEAT_SECONDS
"""A run silent this long (seconds; four missed heartbeats) with a stage still running is shown stopped."""
TASK_ATTEMPTS = 500
"""At most this many attempts of one task are listed (newest kept)."""
FILTERS = ("stage", "iteration", "env", "task_id", "success", "source", "policy_version")
"""What the trajectory browser filters on (each an equality on its column)."""
INT_FILTERS = ("iteration", "policy_version")

T = TrajectoryRow
SUMMARY_COLUMNS = (
    T.id,
    T.stage,
    T.iteration,
    T.env,
    T.task_id,
    T.kind,
    T.source,
    T.policy_version,
    T.trial,
    T.success,
    T.reward,
    T.num_turns,
    T.invalid_actions,
    T.terminated,
    T.truncated,
    T.created_at,
)
"""The columns a list of trajectories shows (never ``messages``: a list reads no conversation)."""


class StoreError(RuntimeError):
    """The URL names no replay store this dashboard can read (missing, not a store, or another schema)."""


def read_only_engine(url: str | URL) -> Engine:
    """An engine on ``url`` that cannot write.

    Raises:
        StoreError: If no replay store of the current schema version is there.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_read_only(parsed.database or "")
    else:
        options = "-c default_transaction_read_only=on"
        engine = create_engine(url, pool_pre_ping=True, connect_args={"options": options})
    shown = parsed.render_as_string(hide_password=True)
    try:
        with engine.connect() as connection:
            version = connection.scalar(select(MetaRow.value).where(MetaRow.key == "schema_version"))
    except Exception as e:  # a missing file, a database without the tables, a refused connection
        engine.dispose()
        raise StoreError(f"cannot read a replay store at {shown}: {e.__class__.__name__}: {e}") from e
    if version != str(SCHEMA_VERSION):
        engine.dispose()
        raise StoreError(
            f"{shown} has replay schema version {version}, this dashboard reads {SCHEMA_VERSION} "
            "(open the store once with the current agentloop to migrate an older one)"
        )
    return engine


def _sqlite_read_only(database: str) -> Engine:
    if not database or database == ":memory:":
        raise StoreError("an in-memory SQLite database holds no run to show")
    if database.startswith("file:"):
        path, _, query = database.removeprefix("file:").partition("?")
        uri_query = "&".join(p for p in query.split("&") if p and not p.startswith("mode=")) + "&mode=ro"
    else:
        path, uri_query = str(Path(database).resolve()), "mode=ro"
        if not Path(path).is_file():
            raise StoreError(f"no replay store at {path}")
    engine = create_engine(f"sqlite:///file:{quote(path)}?{uri_query.lstrip('&')}&uri=true")

    @event.listens_for(engine, "connect")
    def _query_only(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    return engine


@dataclass(frozen=True)
class Outcome:
    """Aggregates of one group of trajectories (a stage's episodes on one env)."""

    episodes: int
    successes: int
    reward: float
    """Sum of final rewards."""
    turns: int
    """Sum of assistant turns."""
    invalid: int
    """Sum of invalid actions."""
    tokens: int
    """Sum of generated tokens."""
    first: datetime | None
    last: datetime | None
    tasks: int = 0
    """Tasks begun: first trials (every episode, without STE's trials)."""

    def as_dict(self) -> dict[str, Any]:
        """The figures a page or the JSON API shows."""
        low, high = wilson_interval(self.successes, self.episodes)
        n = max(self.episodes, 1)
        return {
            "episodes": self.episodes,
            "successes": self.successes,
            "success_rate": self.successes / n,
            "ci_low": low,
            "ci_high": high,
            "reward": self.reward / n,
            "turns": self.turns / n,
            "invalid_action_rate": self.invalid / self.turns if self.turns else 0.0,
            "tokens": self.tokens,
        }


@dataclass
class Stage:
    """One stage of the run: completed (with its metrics) or still running (episodes streamed so far)."""

    name: str
    position: int | None
    """Completion order; None while running."""
    completed_at: datetime | None
    metrics: dict[str, float]
    envs: dict[str, Outcome]
    iteration: int
    pairs: int = 0
    """Pairs the stage built (a DPO stage)."""
    experiences: int = 0
    """Experiences (STE long-term memory) the stage stored."""
    memory_size: int = 0
    """Experiences stored by this stage and every earlier one."""
    extra: dict[str, Any] = field(default_factory=dict)
    started: datetime | None = None
    """When the stage (last) began, as the run recorded it (``ReplayStore.begin_stage``)."""
    planned: int | None = None
    """How many tasks the rollout stage plays, as the run recorded it."""
    fresh: int = 0
    """Tasks begun since ``started`` (a resumed stage stored the others before)."""

    @property
    def family(self) -> str:
        return self.name.split("/")[0]

    @property
    def episodes(self) -> int:
        return sum(o.episodes for o in self.envs.values())

    def as_dict(self) -> dict[str, Any]:
        """The stage as the run view and ``/api/run`` show it."""
        metric = self.metrics.get
        return {
            "name": self.name,
            "family": self.family,
            "running": self.position is None,
            "iteration": self.iteration,
            "completed_at": self.completed_at.isoformat() if self.completed_at else None,
            "episodes": self.episodes,
            "envs": {env: o.as_dict() for env, o in sorted(self.envs.items())},
            "pairs_built": metric("dpo/pairs_built", self.pairs if self.pairs else None),
            "pairs_replayed": metric("dpo/pairs_replayed"),
            "dpo_margin": metric("dpo/rewards/margins"),
            "memory_size": self.memory_size,
            "experiences": self.experiences,
            "tokens_per_s": metric(f"{self.family}/tokens_per_s"),
            "seconds": metric(f"timing/{self.family}"),
        }


class StoreReader:
    """The dashboard's view of one replay store, read-only, with completed stages' aggregates cached."""

    def __init__(self, url: str | URL) -> None:
        self.url = url
        self.engine = read_only_engine(url)
        self._done: dict[str, dict[str, Outcome]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # Run view

    def version(self) -> str:
        """A fingerprint that changes whenever the run writes (a stage begun or completed, a trajectory, a pair)."""
        with self.engine.connect() as c:
            stages = c.execute(select(func.count(), func.max(StageRow.position))).one()
            newest = c.scalar(select(func.max(T.id)))
            pairs = c.scalar(select(func.max(PairRow.id)))
            # A stage beginning: each record's JSON starts with its ISO time, so the greatest is the newest.
            begun = c.execute(select(func.count(), func.max(MetaRow.value)).where(MetaRow.key.startswith(BEGUN))).one()
        started = json.loads(begun[1])["started"] if begun[1] else None
        # A run that stops beating writes nothing more: the page must still learn that it stopped.
        stopped = self.stopped_since() is not None
        return f"{stages[0]}.{stages[1]}.{newest}.{pairs}.{begun[0]}.{started}.{stopped:d}"

    def last_beat(self) -> datetime | None:
        """When the run last said it was alive (:meth:`agentloop.replay.ReplayStore.beat`); None when it never
        did (a store of an older agentloop)."""
        with self.engine.connect() as c:
            value = c.scalar(select(MetaRow.value).where(MetaRow.key == ALIVE))
        return _utc(datetime.fromisoformat(json.loads(value)["at"])) if value else None

    def stopped_since(self, now: datetime | None = None) -> datetime | None:
        """When the run last beat, if a stage is still running and the run has been silent for
        :data:`STOPPED_AFTER` seconds (killed or crashed: ``--resume`` goes on from the last completed stage);
        else None. A store of an older agentloop, which never beat, is never taken for stopped."""
        beat = self.last_beat()
        if beat is None:
            return None
        with self.engine.connect() as c:
            silent = ((now or database_now(c)) - beat).total_seconds()  # both times from the database's clock
            return beat if silent >= STOPPED_AFTER and _running(c) else None

    def stages(self) -> list[Stage]:
        """Every stage, completed ones in completion order, then the running ones."""
        with self.engine.connect() as c:
            completed = c.execute(
                select(StageRow.name, StageRow.position, StageRow.completed_at, StageRow.metrics).order_by(
                    StageRow.position
                )
            ).all()
            done = {row.name for row in completed}
            begun = _begun(c)
            running = sorted(_running(c, done, begun))
            running.sort(key=lambda name: begun.get(name, {}).get("started") or "")
            if done - set(self._done):
                live = self._cache_completed(c, done)
            else:
                live = _outcomes(c, running)
            pairs = dict(c.execute(select(PairRow.stage, func.count()).group_by(PairRow.stage)).all())
            memory = dict(c.execute(select(ExperienceRow.stage, func.count()).group_by(ExperienceRow.stage)).all())
        found = [
            Stage(r.name, r.position, _utc(r.completed_at), _decode(r.metrics), *self._done.get(r.name, ({}, 0)))
            for r in completed
        ]
        found += [Stage(name, None, None, {}, *live.get(name, ({}, 0))) for name in running]
        size = 0
        for stage in found:
            stage.iteration = _iteration(stage.name, stage.iteration)
            stage.pairs, stage.experiences = pairs.get(stage.name, 0), memory.get(stage.name, 0)
            size += stage.experiences
            stage.memory_size = size
            if stage.position is None and stage.name in begun:
                stage.started = _utc(datetime.fromisoformat(begun[stage.name]["started"]))
                stage.planned = begun[stage.name].get("tasks")
                if stage.envs:
                    stage.fresh = self._begun_since(stage.name, stage.started)
        return found

    def _begun_since(self, stage: str, started: datetime) -> int:
        """Tasks of a running stage begun (first trials stored) at or after ``started``."""
        since = started.replace(tzinfo=None) if self.engine.dialect.name == "sqlite" else started  # stored as UTC
        stmt = select(func.count()).where(T.stage == stage, T.trial == 0, T.created_at >= since)
        with self.engine.connect() as c:
            return int(c.scalar(stmt) or 0)

    def _cache_completed(self, c: Any, done: set[str]) -> dict[str, tuple[dict[str, Outcome], int]]:
        """Aggregates every stage in one pass over the table (faster than the stage index when most rows
        are wanted), keeps the completed stages' and returns the others'."""
        with self._lock:
            found = _outcomes(c, None)
            for name in done:
                self._done[name] = found.get(name, ({}, 0))
        return {name: value for name, value in found.items() if name not in done}

    def run(self) -> dict[str, Any]:
        """What the run view shows: every stage with its per-env figures, the learning curves, the progress, and
        ``stopped_since`` when the run left a stage running and stopped (:meth:`stopped_since`)."""
        stages = self.stages()
        stopped = self.stopped_since()
        return {
            "version": self.version(),
            "stopped_since": stopped.isoformat() if stopped else None,
            "stages": [s.as_dict() for s in stages],
            "progress": [progress(s, stages) for s in stages if s.position is None],
            "curves": curves(stages),
        }

    # Trajectories

    def options(self) -> dict[str, list[Any]]:
        """The values the browser's filters offer (stages, envs, sources, iterations, policy versions)."""
        with self.engine.connect() as c:
            stages = list(c.scalars(select(StageRow.name).order_by(StageRow.position)))
            stages += sorted(set(c.scalars(select(T.stage).distinct())) - set(stages))
            envs = sorted(c.scalars(select(T.env).distinct()))
            by_iteration = c.execute(select(T.iteration, T.source).distinct()).all()
        return {
            "stage": stages,
            "env": envs,
            "iteration": sorted({r.iteration for r in by_iteration}),
            "source": sorted({r.source for r in by_iteration}),
            "success": ["true", "false"],
        }

    def trajectories(self, filters: Mapping[str, Any], before: int | None = None) -> list[Any]:
        """One page of trajectories (newest first) matching ``filters``, with ids below ``before``."""
        stmt = select(*SUMMARY_COLUMNS).where(*_where(filters)).order_by(T.id.desc()).limit(PAGE_SIZE)
        if "task_id" in filters and "env" not in filters:  # lets the (env, task_id) index find the task
            stmt = stmt.where(T.env.in_(select(T.env).distinct().scalar_subquery()))
        if before is not None:
            stmt = stmt.where(T.id < before)
        with self.engine.connect() as c:
            return c.execute(stmt).all()

    def trajectory(self, trajectory_id: int) -> dict[str, Any] | None:
        """One trajectory with its conversation, and the pairs it is part of."""
        with self.engine.connect() as c:
            row = c.execute(select(T).where(T.id == trajectory_id)).mappings().one_or_none()
            if row is None:
                return None
            pairs = c.execute(
                select(PairRow.id, PairRow.stage, PairRow.chosen_id, PairRow.rejected_num_messages).where(
                    or_(PairRow.chosen_id == trajectory_id, PairRow.rejected_id == trajectory_id)
                )
            ).all()
            stages = set(c.scalars(select(StageRow.name)))
        found = dict(row)
        found["training"], trained = training_use(found, pairs, stages)
        found["turns"] = turns(found["messages"], trained)
        found["pairs"] = pairs
        return found

    def task(self, env: str, task_id: str) -> list[Any]:
        """Every stored attempt of one task (at most :data:`TASK_ATTEMPTS`, the newest), oldest first."""
        stmt = (
            select(*SUMMARY_COLUMNS, T.instruction)
            .where(T.env == env, T.task_id == task_id)
            .order_by(T.id.desc())
            .limit(TASK_ATTEMPTS)
        )
        with self.engine.connect() as c:
            return list(reversed(c.execute(stmt).all()))

    # Pairs

    def pairs(self, stage: str | None, env: str | None, before: int | None = None) -> list[Any]:
        """One page of pairs (newest first), with both trajectories' outcomes."""
        chosen, rejected = T.__table__.alias("chosen"), T.__table__.alias("rejected")
        stmt = (
            select(
                PairRow.id,
                PairRow.stage,
                PairRow.iteration,
                PairRow.env,
                PairRow.task_id,
                PairRow.chosen_id,
                PairRow.rejected_id,
                chosen.c.reward.label("chosen_reward"),
                rejected.c.reward.label("rejected_reward"),
                PairRow.rejected_num_turns,
                chosen.c.num_turns.label("chosen_turns"),
            )
            .join(chosen, chosen.c.id == PairRow.chosen_id)
            .join(rejected, rejected.c.id == PairRow.rejected_id)
            .order_by(PairRow.id.desc())
            .limit(PAGE_SIZE)
        )
        conditions = [PairRow.stage == stage if stage else None, PairRow.env == env if env else None]
        conditions.append(PairRow.id < before if before is not None else None)
        stmt = stmt.where(*[x for x in conditions if x is not None])
        with self.engine.connect() as c:
            return c.execute(stmt).all()

    def pair(self, pair_id: int) -> dict[str, Any] | None:
        """One pair: both conversations turn by turn (the rejected one cut as trained), where they diverge,
        and the DPO margin its stage logged."""
        with self.engine.connect() as c:
            pair = c.execute(select(PairRow).where(PairRow.id == pair_id)).mappings().one_or_none()
            if pair is None:
                return None
            rows = c.execute(select(T).where(T.id.in_([pair["chosen_id"], pair["rejected_id"]]))).mappings().all()
            metrics = c.scalar(select(StageRow.metrics).where(StageRow.name == pair["stage"]))
        by_id = {r["id"]: dict(r) for r in rows}
        chosen, rejected = by_id[pair["chosen_id"]], by_id[pair["rejected_id"]]
        kept = pair["rejected_num_messages"]
        chosen_turns = turns(chosen["messages"])
        rejected_turns = turns(rejected["messages"][:kept])
        margins = {k: v for k, v in _decode(metrics or {}).items() if "margin" in k}
        return {
            "pair": dict(pair),
            "chosen": chosen,
            "rejected": rejected,
            "rows": _side_by_side(chosen_turns, rejected_turns),
            "diverge": divergence(chosen["messages"], rejected["messages"][:kept]),
            "cut": len(rejected["messages"]) - kept,
            "margins": margins,
        }


def _outcomes(c: Any, stages: list[str] | None) -> dict[str, tuple[dict[str, Outcome], int]]:
    """Per stage, its trajectories' aggregates per env and its highest iteration (one grouped query; all
    stages when ``stages`` is None)."""
    if stages is not None and not stages:
        return {}
    stmt = select(
        T.stage,
        T.env,
        func.count(),
        func.sum(case((T.success, 1), else_=0)),
        func.sum(T.reward),
        func.sum(T.num_turns),
        func.sum(T.invalid_actions),
        func.sum(T.generated_tokens),
        func.sum(case((T.trial == 0, 1), else_=0)),
        func.min(T.created_at),
        func.max(T.created_at),
        func.max(T.iteration),
    ).group_by(T.stage, T.env)
    if stages is not None:
        stmt = stmt.where(T.stage.in_(stages))
    found: dict[str, tuple[dict[str, Outcome], int]] = {}
    for stage, env, n, k, reward, turns_, invalid, tokens, tasks, first, last, iteration in c.execute(stmt):
        outcome = Outcome(n, int(k or 0), float(reward or 0), int(turns_ or 0), int(invalid or 0), int(tokens or 0),
                          _utc(first), _utc(last), int(tasks or 0))  # fmt: skip
        envs, before = found.get(stage, ({}, 0))
        envs[env] = outcome
        found[stage] = (envs, max(before, iteration))
    return found


def progress(stage: Stage, stages: list[Stage], now: datetime | None = None) -> dict[str, Any]:
    """How far a running stage is: tasks begun, of how many (as the run recorded when the stage began; for a
    store of an older agentloop, what the last completed stage of its family played, the experts' tasks for
    explore's first round), its episodes (several per task with STE's trials), and when it should end.
    A training stage stores nothing until it completes: it shows only how long it has run."""
    total = stage.planned
    if total is None and stage.envs:
        earlier = [s for s in stages if s.position is not None and s.family == stage.family and s.episodes]
        if not earlier and stage.family == "explore":
            earlier = [s for s in stages if s.position is not None and s.family == "experts"]
        total = earlier[-1].episodes if earlier else None
    done = sum(o.tasks for o in stage.envs.values())
    times = [t for o in stage.envs.values() for t in (o.first, o.last) if t is not None]
    now = now or datetime.now(UTC)
    eta = None
    if total and times and total > done:
        if stage.started is not None:
            # The pace since the stage (last) began, start-up included; what a resumed stage stored before is not.
            if stage.fresh:
                eta = max(0.0, (max(times) - stage.started).total_seconds() / stage.fresh * (total - done))
        elif done > 1:
            eta = (max(times) - min(times)).total_seconds() / (done - 1) * (total - done)
    elapsed = (now - stage.started).total_seconds() if stage.started is not None else None
    return {
        "stage": stage.name,
        "done": done,
        "total": total,
        "episodes": stage.episodes,
        "elapsed_seconds": elapsed,
        "eta_seconds": eta,
    }


def curves(stages: list[Stage]) -> dict[str, Any]:
    """The learning curves: per env, success rate with its 95% interval over the eval stages, and over
    the explore rounds; stage times; generation throughput."""
    result: dict[str, Any] = {}
    for family in ("eval", "explore"):
        chosen = [s for s in stages if s.family == family and s.envs]
        envs = sorted({env for s in chosen for env in s.envs})
        series = {}
        for env in envs:
            points = [s.envs[env].as_dict() if env in s.envs else None for s in chosen]
            series[env] = {
                "rate": [p and p["success_rate"] for p in points],
                "low": [p and p["ci_low"] for p in points],
                "high": [p and p["ci_high"] for p in points],
                "reward": [p and p["reward"] for p in points],
            }
        result[family] = {"labels": [s.name for s in chosen], "series": series}
    timed = [s for s in stages if f"timing/{s.family}" in s.metrics]
    result["timing"] = {"labels": [s.name for s in timed], "seconds": [s.metrics[f"timing/{s.family}"] for s in timed]}
    return result


ACTION = re.compile(r"^\s*(?:Action|Act)\s*:", re.MULTILINE)
THOUGHT = re.compile(r"^\s*Thought\s*:\s*", re.IGNORECASE)


def split_thought(content: str) -> tuple[str, str]:
    """An assistant turn as (thought, action): ETO's ``Thought: ... Action: ...`` split at the action;
    a turn without that shape is all action."""
    found = ACTION.search(content)
    if found is None or found.start() == 0:
        return "", content
    return THOUGHT.sub("", content[: found.start()], count=1).strip(), content[found.start() :].strip()


def training_use(row: Mapping[str, Any], pairs: list[Any], stages: set[str]) -> tuple[list[str], int]:
    """What trained on a stored trajectory, by the completed stages: the SFT on demonstrations (an expert's),
    a round's SFT on exploration successes (STE's ``round_sft/<iteration>``; its replayed share of earlier
    data is not recorded, so not shown), and DPO pairs (a rejected trajectory up to its cut); and how many of
    its messages, from the start, they trained on (0: none)."""
    uses, upto, n = [], 0, len(row["messages"])
    if row["source"] == "expert" and "sft" in stages:  # ETO's and STE's SFT: every demonstration
        uses.append("SFT on demonstrations")
        upto = n
    elif row["source"] == "expert" and (phases := sorted(s for s in stages if s.startswith("sft/"))):
        # A continual run's phase SFT trains its envs' demonstrations (and replays a share of earlier ones):
        # which phase had this env is in the run's config, not in its store, so no turn is marked.
        uses.append(f"maybe {', '.join(phases)} (the phase whose envs include {row['env']})")
    if row["source"] == "explore" and row["success"] and f"round_sft/{row['iteration']}" in stages:
        uses.append(f"round_sft/{row['iteration']}, SFT on the round's successes")
        upto = n
    for pair in pairs:
        if pair.chosen_id == row["id"]:
            uses.append(f"{pair.stage}: pair #{pair.id}, chosen")
            upto = n
        else:
            uses.append(f"{pair.stage}: pair #{pair.id}, rejected, up to message #{pair.rejected_num_messages - 1}")
            upto = max(upto, pair.rejected_num_messages)
    return uses, upto


def turns(messages: list[dict[str, Any]], trained: int | None = None) -> list[dict[str, Any]]:
    """A stored conversation as the trajectory page shows it: observations, and thoughts and actions,
    with each message's tokens and whether the learner trained on them: the assistant-only loss mask's
    turns among the first ``trained`` messages (None: all of them, as in a pair)."""
    shown = []
    for index, m in enumerate(messages):
        thought, action = split_thought(m["content"]) if m["role"] == "assistant" else ("", m["content"])
        shown.append(
            {
                "index": index,
                "role": m["role"],
                "thought": thought,
                "text": action,
                "tokens": len(m.get("token_ids", ())),
                "token_ids": m.get("token_ids", ()),
                # An expert's turns are stored untokenized; the learner tokenizes them and trains on them all the same.
                "trained": m["role"] == "assistant" and (trained is None or index < trained),
                "policy_version": m.get("policy_version"),
            }
        )
    return shown


def divergence(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> int | None:
    """Index of the first message where two conversations differ (None when one is a prefix of the other)."""
    for index, (a, b) in enumerate(zip(chosen, rejected, strict=False)):
        if a["role"] != b["role"] or a["content"] != b["content"]:
            return index
    return None


def _side_by_side(chosen: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> list[tuple[Any, Any]]:
    length = max(len(chosen), len(rejected))
    return [(chosen[i] if i < len(chosen) else None, rejected[i] if i < len(rejected) else None) for i in range(length)]


def parse_filters(query: Mapping[str, str]) -> dict[str, Any]:
    """The trajectory browser's filters from a query string; empty values mean no filter.

    Raises:
        ValueError: If an integer filter is not an integer.
    """
    found: dict[str, Any] = {}
    for name in FILTERS:
        value = query.get(name, "").strip()
        if not value:
            continue
        if name in INT_FILTERS:
            found[name] = int(value)
        elif name == "success":
            found[name] = value.lower() in ("1", "true", "yes")
        else:
            found[name] = value
    return found


def _where(filters: Mapping[str, Any]) -> list[Any]:
    conditions = [getattr(T, name) == value for name, value in filters.items() if name in FILTERS]
    return [and_(*conditions)] if conditions else []


def _decode(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


def _begun(c: Any) -> dict[str, dict[str, Any]]:
    """Each stage's beginning as the run recorded it (``begun/<stage>``)."""
    found = c.execute(select(MetaRow.key, MetaRow.value).where(MetaRow.key.startswith(BEGUN)))
    return {key.removeprefix(BEGUN): json.loads(value) for key, value in found}


def _running(c: Any, done: set[str] | None = None, begun: Mapping[str, Any] | None = None) -> set[str]:
    """The stages begun, or holding trajectories, and not completed."""
    done = set(c.scalars(select(StageRow.name))) if done is None else done
    begun = _begun(c) if begun is None else begun
    return (set(c.scalars(select(T.stage).distinct())) | set(begun)) - done


def _utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes (the store writes UTC); PostgreSQL aware ones."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _iteration(name: str, stored: int) -> int:
    """A stage's loop iteration: its name's number (``dpo/2``), else its trajectories' (``eval/sft``: 0)."""
    tail = name.rsplit("/", 1)[-1]
    return int(tail) if "/" in name and tail.isdecimal() else stored
