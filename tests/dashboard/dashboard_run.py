"""A small real run in a SQLite replay store, written through the store's own API, for the dashboard's tests
(a module of its own, not conftest.py: tests/replay has a conftest.py too, and both are imported as ``conftest``)."""

from __future__ import annotations

from dataclasses import replace

from agentloop.replay import ReplayStore
from agentloop.types import Message, Pair, Task, Trajectory

SCRIPT = "<script>window.pwned = 1</script><img src=x onerror=alert(1)>"
"""Agent output that a careless page would run."""
ENVS = ("db", "os")


def task(env: str, n: int) -> Task:
    return Task(env, f"train-{n}", "train", "SELECT", f"Answer question {n} about the table.")


def trajectory(t: Task, *, success: bool, source: str = "explore", iteration: int = 1, version: int = 1,
               action: str = "Action: Answer\nFinal Answer: [1]", observation: str = "") -> Trajectory:  # fmt: skip
    messages = (
        Message("user", observation or f"{t.instruction}\nTable: t(a, b)", (1, 2, 3, 4)),
        Message("assistant", "Thought: I should look at the table.\nAction: Operation\nSELECT a FROM t", (5, 6, 7)),
        Message("user", "[(1,)]", (8, 9)),
        Message("assistant", action, (10, 11)),
    )
    return Trajectory(
        task=t, messages=messages, tokenizer="tiny", reward=float(success), success=success, terminated=True,
        truncated=False, num_turns=2, invalid_actions=0 if success else 1, source=source,  # type: ignore[arg-type]
        policy_version=version, iteration=iteration, generated_tokens=5,
    )  # fmt: skip


def build_run(url: str) -> dict[str, int]:
    """Writes a small run into the store at ``url``: experts, eval/base, sft, explore/1, dpo/1 (pairs) and
    eval/1 completed; explore/2 begun (8 tasks) and running with 2 episodes.

    Returns:
        Ids of notable rows: the hostile trajectory, a pair.
    """
    with ReplayStore(url) as store:
        tasks = [task(env, n) for env in ENVS for n in range(4)]
        experts = [trajectory(t, success=True, source="expert", iteration=0, version=-1) for t in tasks]
        store.commit_stage("experts", trajectories=experts, metrics={"timing/experts": 3.0})
        evals = [trajectory(t, success=i % 2 == 0, source="eval", iteration=0, version=0) for i, t in enumerate(tasks)]
        store.commit_stage("eval/base", trajectories=evals, metrics={"timing/eval": 12.0, "eval/tokens_per_s": 50.0})
        store.commit_stage("sft", metrics={"timing/sft": 30.0, "sft/loss": 1.5})
        explored = [trajectory(t, success=i % 3 == 0) for i, t in enumerate(tasks)]
        hostile = trajectory(task("db", 99), success=False, observation=SCRIPT, action=f"Action: Answer\n{SCRIPT}")
        explored.append(hostile)
        ids = store.add_episodes(explored, "explore/1")
        store.commit_stage("explore/1", metrics={"timing/explore": 20.0, "explore/tokens_per_s": 80.0})
        failures = [t for t in explored if not t.success and t.task.task_id != "train-99"]
        expert_of = {t.task: t for t in experts}
        pairs = [Pair(f.task, expert_of[f.task], replace(f, messages=f.messages[:2], num_turns=1), 1) for f in failures]
        store.commit_stage(
            "dpo/1",
            pairs=pairs,
            metrics={"timing/dpo": 40.0, "dpo/pairs_built": float(len(pairs)), "dpo/pairs_replayed": 0.0,
                     "dpo/rewards/margins": 0.4321},
        )  # fmt: skip
        later = [trajectory(t, success=True, source="eval", iteration=1, version=2) for t in tasks]
        store.commit_stage("eval/1", trajectories=later, metrics={"timing/eval": 11.0})
        store.begin_stage("explore/2", tasks=len(tasks))  # as Stages.stream records it
        store.add_episodes([trajectory(t, success=True, iteration=2, version=2) for t in tasks[:2]], "explore/2")
        pair_id = len(pairs)  # ids start at 1
    return {"hostile": ids[-1], "pair": pair_id, "pairs": len(pairs)}
