"""Step and reset latency of an environment over its expert episodes, and what 1,000 episodes leave behind.

    python bench/env_steps.py webshop [episodes] [tasks]   # default 1000 episodes over as many tasks
    python bench/env_steps.py alfworld 1000 100            # 1,000 episodes cycling over 100 games
    python bench/env_steps.py os [episodes] [tasks]        # as root, with bubblewrap installed
    python bench/env_steps.py db [episodes] [tasks]

Builds the expert demonstrations of the first ``tasks`` training tasks (``build_experts``;
default ``episodes``; fewer saves time where experts are slow to build, as ALFWorld's at 2.8 s
a game), then plays ``episodes`` episodes cycling over them: each one replays a
demonstration's actions, except every 10th, which plays the hostile corpus's worst actions
instead (fork bomb, endless loop, huge output: see ``HOSTILE``), so the episodes end both ways.
Prints the median and 95th percentile of ``step`` per kind of action (the first word of the
command: ``search``, ``click``, ``go``, ``take``, ...), of ``reset`` and of an episode's end,
and the targets of issue 3 (WebShop search <= 20 ms, ALFWorld step <= 50 ms; the OS overhead
over plain bash has its own bench, ``bench/os_latency.py``).

Before and after, it counts this process's open file descriptors, its child processes, the
processes of the sandbox uids, and the entries of the temp directory, and prints the
differences: after ``close`` every one of them must be back where it started. It also prints
the process's resident memory after every tenth of the episodes, and its child processes'
(e.g. the Database env's worker), which should level off rather than grow with them.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

from agentloop import envs

TARGETS_MS = {("webshop", "search"): 20.0, ("alfworld", "step"): 50.0}
HOSTILE = {
    "os": ["Act: bash\n```bash\n:(){ :|:& };:\n```", "Act: bash\n```bash\nwhile true; do :; done\n```"],
    "webshop": ["search[" + "x" * 900 + "]", "click[\x00]"],
    "alfworld": ["Action: go to the moon", "\x00\x01" * 100],
    "db": [
        "Action: Operation\n```sql\nWITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT 1;\n```",
        "Action: Operation\n```sql\nCREATE TEMP TABLE t AS SELECT 1;\n```",
    ],
}


def leftovers() -> dict[str, int]:
    """What an environment could leak: fds, child processes, sandbox-uid processes, temp entries."""
    me = psutil.Process()
    sandbox = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real >= 61000)
    return {
        "resident memory MiB": me.memory_info().rss >> 20,
        "open fds": me.num_fds(),
        "child processes": len(me.children(recursive=True)),
        "sandbox-uid processes": sandbox,
        "temp entries": len(os.listdir(tempfile.gettempdir())),
    }


def env_config(env: str):
    return envs.definition(env).config()


def action_kind(action: str) -> str:
    """The command's first word (``search``, ``go``, ...); for an SQL operation, ``SQL`` and its statement's."""
    words = action.removeprefix("Action: ").split("[")[0].split()
    if words[:1] == ["Operation"] and "```sql" in action:
        return "SQL " + (action.split("```sql", 1)[1].split() or ["?"])[0].upper()
    return words[0] if words else "other"


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"median {statistics.median(ordered) * 1000:8.2f} ms  p95 {p95 * 1000:8.2f} ms  (n={len(ordered)})"


def main() -> None:
    name = sys.argv[1]
    episodes = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    distinct = int(sys.argv[3]) if len(sys.argv) > 3 else episodes
    data_dir = Path(os.environ.get("AGENTLOOP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    config = env_config(name)
    before = leftovers()
    tasks = envs.load_tasks(name, data_dir, "train")[:distinct]
    expert_class = envs.definition(name).expert_config
    expert_config = None if expert_class is None else expert_class()
    if name == "db":
        expert_config.recovery_fraction = 0.0
    demos, _ = envs.build_experts(name, tasks, config, expert_config, seed=0)
    by_id = {t.task.task_id: t for t in tasks}
    scripts = [(by_id[d.task.task_id], [m.content for m in d.messages if m.role == "assistant"]) for d in demos]
    env = envs.make_env(name, [t for t, _ in scripts], config)
    order = [scripts[i % len(scripts)] for i in range(episodes)]
    if hasattr(env, "prepare"):
        env.prepare([t.task.task_id for t, _ in order])
    steps: dict[str, list[float]] = defaultdict(list)
    resets, ends, successes, memory, child_memory = [], [], 0, [], []
    started = time.perf_counter()
    for i, (task, actions) in enumerate(order):
        if i % 10 == 9:
            actions = HOSTILE[name]
        t0 = time.perf_counter()
        env.reset(options={"task_id": task.task.task_id})
        resets.append(time.perf_counter() - t0)
        done = False
        for action in actions:
            kind = action_kind(action)
            t0 = time.perf_counter()
            _, _, terminated, truncated, info = env.step(action)
            elapsed = time.perf_counter() - t0
            done = terminated or truncated
            (ends if done else steps[kind]).append(elapsed)
            steps["step"].append(elapsed)
            if done:
                successes += info["success"]
                break
        if (i + 1) % max(1, episodes // 10) == 0:
            memory.append(psutil.Process().memory_info().rss >> 20)
            child_memory.append(sum(c.memory_info().rss for c in psutil.Process().children(recursive=True)) >> 20)
    env.close()
    wall = time.perf_counter() - started
    after = leftovers()
    experts = episodes - episodes // 10
    print(
        f"{name}: {episodes} episodes over {len(scripts)} tasks ({experts} expert, the rest hostile)"
        f" in {wall:.0f} s; {successes} succeeded"
    )
    print(f"  reset        {percentiles(resets)}")
    for kind, samples in sorted(steps.items(), key=lambda item: -len(item[1])):
        target = TARGETS_MS.get((name, kind))
        note = f"  = {statistics.median(samples) * 1000 / target:.2f} x target ({target:g} ms)" if target else ""
        print(f"  {kind:<12} {percentiles(samples)}{note}")
    if ends:
        print(f"  last step    {percentiles(ends)}")
    print(f"  resident memory MiB after each tenth of the episodes: {memory}")
    print(f"  resident memory MiB of its child processes then: {child_memory}")
    for key in before:
        print(f"  {key}: {before[key]} before, {after[key]} after ({after[key] - before[key]:+d})")


if __name__ == "__main__":
    main()
