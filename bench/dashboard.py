"""Page times of ``agentloop dashboard`` over a replay store of 100,000 trajectories (target: every page < 1 s).

    python bench/dashboard.py [--trajectories 100000] [--store /tmp/agentloop-bench-dashboard/replay.db] [--rebuild]

Builds the store once through the store's own API (``ReplayStore.add_episodes`` as a run streams episodes,
``commit_stage`` with trajectories, pairs and metrics), shaped like an ETO run over two envs: experts,
eval/base, sft, eval/sft, then rounds of explore (most of the trajectories), dpo (pairs) and eval, and a last
explore round still running. A store already there with enough trajectories is reused (``--rebuild``
builds it again).

Then times every page in-process (starlette's TestClient: routing, SQL, templates; no network): the first
request of the run view (cold: no stage's aggregates cached) and then the median and the worst of
``--repeats`` requests of each page. The baseline, measured in the same run on the same store, is the store's
own per-stage-and-env aggregate, ``ReplayStore.metrics(by=("stage", "env"))``: a page's ratio is its median
over that. Timings vary with the machine's load: compare ratios, not seconds, across machines.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from agentloop.replay import ReplayStore
from agentloop.types import Message, Pair, Task, Trajectory

ENVS = ("db", "os")
TARGET_S = 1.0
WORDS = "select the table where value join order group count answer column row filter".split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def episode(rng: random.Random, task: Task, source: str, iteration: int, version: int) -> Trajectory:
    """A 6-message episode (about 2.5 kB stored), its success drawn with a rate that grows with the version."""
    success = rng.random() < 0.3 + 0.1 * max(version, 0)
    messages = []
    for turn in range(3):
        observation = text(rng, 40) if turn else f"{task.instruction}\n{text(rng, 40)}"
        action = f"Thought: {text(rng, 12)}\nAction: Operation\n{text(rng, 10)}"
        messages.append(Message("user", observation, tuple(rng.randrange(32000) for _ in range(50))))
        messages.append(Message("assistant", action, tuple(rng.randrange(32000) for _ in range(25)), (), version))
    return Trajectory(
        task=task, messages=tuple(messages), tokenizer="bench", reward=float(success), success=success,
        terminated=True, truncated=False, num_turns=3, invalid_actions=int(rng.random() < 0.1), source=source,  # type: ignore[arg-type]
        policy_version=version, iteration=iteration, generated_tokens=75,
    )  # fmt: skip


def build(path: Path, total: int, rounds: int = 4, batch: int = 500) -> None:
    """An ETO-shaped run of about ``total`` trajectories (see the module docstring)."""
    rng = random.Random(0)
    experts_n, eval_n = total // 50, total // 25
    explore_n = (total - experts_n - eval_n * (rounds + 2) - total // 100) // rounds
    tasks = [Task(ENVS[i % 2], f"train-{i}", "train", "SELECT", f"Task {i}: {text(rng, 15)}") for i in range(explore_n)]
    held_out = [Task(ENVS[i % 2], f"dev-{i}", "dev", "SELECT", f"Held-out {i}") for i in range(eval_n)]
    started = time.perf_counter()
    with ReplayStore(f"sqlite:///{path}") as store:
        experts = {t: episode(rng, t, "expert", 0, -1) for t in tasks[:experts_n]}
        experts = {t: replace_success(e) for t, e in experts.items()}
        store.commit_stage("experts", trajectories=list(experts.values()), metrics={"timing/experts": 60.0})

        def rollout(stage: str, todo: list[Task], source: str, iteration: int, version: int, planned: int = 0):
            store.begin_stage(stage, tasks=planned or len(todo))  # as the run's Stages.stream records it
            found = [episode(rng, t, source, iteration, version) for t in todo]
            for start in range(0, len(found), batch):
                store.add_episodes(found[start : start + batch], stage)
            return found

        def evaluate(stage: str, it: int, version: int) -> None:
            rollout(stage, held_out, "eval", it, version)
            store.commit_stage(stage, metrics={"timing/eval": 300.0, "eval/tokens_per_s": 900.0})

        evaluate("eval/base", 0, 0)
        store.begin_stage("sft")
        store.commit_stage("sft", metrics={"timing/sft": 600.0, "sft/loss": 0.8})
        evaluate("eval/sft", 0, 1)
        for it in range(1, rounds + 1):
            found = rollout(f"explore/{it}", tasks, "explore", it, it)
            store.commit_stage(f"explore/{it}", metrics={"timing/explore": 1200.0, "explore/tokens_per_s": 950.0})
            pairs = [Pair(t.task, experts[t.task], t, it) for t in found if t.task in experts and not t.success]
            metrics = {"timing/dpo": 900.0, "dpo/pairs_built": float(len(pairs)), "dpo/rewards/margins": 0.1 * it}
            store.begin_stage(f"dpo/{it}")
            store.commit_stage(f"dpo/{it}", pairs=pairs, metrics=metrics)
            evaluate(f"eval/{it}", it, it + 1)
            print(f"  round {it} stored ({time.perf_counter() - started:.0f} s)", flush=True)
        still = tasks[: total // 100]  # the last round is still running: a few of its tasks played
        rollout(f"explore/{rounds + 1}", still, "explore", rounds + 1, rounds + 1, planned=len(tasks))
    print(f"built {path} in {time.perf_counter() - started:.0f} s ({path.stat().st_size >> 20} MiB)")


def replace_success(t: Trajectory) -> Trajectory:
    from dataclasses import replace

    return replace(t, success=True, reward=1.0)


def timed(call, repeats: int) -> tuple[float, float]:
    """Median and worst wall time of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=100_000)
    parser.add_argument("--store", type=Path, default=Path("/tmp/agentloop-bench-dashboard/replay.db"))
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from sqlalchemy import func, select
    from starlette.testclient import TestClient

    from agentloop.dashboard import create_app
    from agentloop.dashboard.queries import read_only_engine
    from agentloop.replay.tables import PairRow, TrajectoryRow

    if args.rebuild and args.store.exists():
        for suffix in ("", "-wal", "-shm"):
            Path(f"{args.store}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{args.store}"
    stored = 0
    if args.store.exists():
        engine = read_only_engine(url)
        with engine.connect() as c:
            stored = c.scalar(select(func.count()).select_from(TrajectoryRow))
        engine.dispose()
    if stored < args.trajectories:
        if stored:
            raise SystemExit(f"{args.store} holds {stored} trajectories, fewer than asked: pass --rebuild")
        args.store.parent.mkdir(parents=True, exist_ok=True)
        build(args.store, args.trajectories)
    engine = read_only_engine(url)
    with engine.connect() as c:
        stored = c.scalar(select(func.count()).select_from(TrajectoryRow))
        middle = c.scalar(select(func.max(TrajectoryRow.id))) // 2
        pair = c.scalar(select(func.max(PairRow.id))) // 2
    engine.dispose()
    print(f"store: {args.store}, {stored:,} trajectories")

    with ReplayStore(url) as store:
        base, _ = timed(lambda: store.metrics(by=("stage", "env")), args.repeats)
    print(f"baseline ReplayStore.metrics(by=('stage', 'env')): {base * 1000:.0f} ms\n")

    pages = {
        "run view": "/",
        "run data (JSON)": "/api/run",
        "run fragment (live update)": "/fragments/run",
        "version (polled)": "/api/version",
        "trajectories": "/trajectories",
        "trajectories, page 100 back": f"/trajectories?before={middle}",
        "trajectories stage=explore/3": "/trajectories?stage=explore/3",
        "trajectories env=db success=false": "/trajectories?env=db&success=false",
        "trajectories source=eval iteration=4": "/trajectories?source=eval&iteration=4",
        "trajectories policy_version=2": "/trajectories?policy_version=2",
        "trajectories task_id=train-42 (no env)": "/trajectories?task_id=train-42",
        "trajectories stage+env+task+outcome": "/trajectories?stage=explore/2&env=db&task_id=train-42&success=true",
        "trajectory": f"/trajectories/{middle}",
        "pairs": "/pairs",
        "pairs stage=dpo/2": "/pairs?stage=dpo/2",
        "pair": f"/pairs/{pair}",
        "task": "/tasks/db/train-42",
    }
    with TestClient(create_app(url)) as client:
        started = time.perf_counter()
        assert client.get("/").status_code == 200
        cold = time.perf_counter() - started
        print(f"{'page':42} {'median':>9} {'worst':>9} {'ratio':>7}  target {TARGET_S:.0f} s")
        print(f"{'run view, first request (cold cache)':42} {cold * 1000:7.0f}ms {'':>9} {cold / base:7.2f}  "
              f"{'ok' if cold < TARGET_S else 'OVER'}")  # fmt: skip
        for name, path in pages.items():
            response = client.get(path)
            assert response.status_code == 200, (path, response.status_code)
            median, worst = timed(lambda p=path: client.get(p), args.repeats)
            verdict = "ok" if worst < TARGET_S else "OVER"
            print(f"{name:42} {median * 1000:7.0f}ms {worst * 1000:7.0f}ms {median / base:7.2f}  {verdict}")


if __name__ == "__main__":
    main()
