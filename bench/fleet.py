"""The rollout fleet on one machine: throughput with 1, 2 and 4 actors, the time for a new policy
version to be live on every actor, and what storing episodes as they finish costs.

For each fleet size it starts the actors on a local Ray cluster, puts them on ``--adapter``
(version 1), plays the held-out DB episodes through the fleet while a SQLite replay store
commits every ``--commit-every`` finished episodes (as ``experiments/eto.py`` does), then
publishes the adapter again as versions 2, 3 and 4 and times each until every actor has
it live (the driver's ``Fleet.ensure``: the adapter's files travel to each actor, which merges
them and reloads its engine's weights). On a 2-core machine the actors share the two cores
(one each with two actors; four actors oversubscribe them): the ratios say what a fleet costs
or gains here, not what it does on a cluster.

Usage:
  python bench/fleet.py --adapter runs/eto-.../adapters/sft --actors 1,2,4
  python bench/fleet.py --adapter runs/eto-.../adapters/sft --backend vllm --actors 1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="task data (default: AGENTLOOP_DATA_DIR)")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--backend", default="transformers")
    parser.add_argument("--actors", default="1,2,4")
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--commit-every", type=int, default=8)
    args = parser.parse_args()

    import eto
    import ray

    from agentloop import envs
    from agentloop.actors.fleet import Fleet
    from agentloop.actors.transfer import pack_dir
    from agentloop.config import load_config
    from agentloop.replay import ReplayStore
    from agentloop.rollout import RolloutStats

    data_dir = args.data_dir or Path(os.environ.get("AGENTLOOP_DATA_DIR", "data"))
    tasks = envs.load_tasks("db", data_dir, "dev")[: args.tasks]
    keys = [f"{t.task.env}/{t.task.task_id}" for t in tasks]
    files = pack_dir(args.adapter)
    sizes = [int(n) for n in args.actors.split(",")]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=max(sizes) + 1, include_dashboard=False, log_to_driver=False)
    rows = []
    for n in sizes:
        overrides = [f"data_dir={data_dir}", f"policy.model={args.model}", f"policy.backend={args.backend}"]
        config = load_config(eto.ETOConfig, None, [*overrides, f"rollout.actors={n}"])
        config.fit_lengths()
        started = time.perf_counter()
        fleet = Fleet(config, tasks)
        start_s = time.perf_counter() - started
        first_s = fleet.ensure(1, files)
        with tempfile.TemporaryDirectory() as tmp, ReplayStore(f"sqlite:///{tmp}/replay.db") as store:
            commit_s, started = 0.0, time.perf_counter()
            for item in fleet.play(keys, "eval", 0, args.commit_every):
                if isinstance(item, RolloutStats):
                    stats = item
                    continue
                before = time.perf_counter()
                store.add_episodes(item, "eval/bench")
                commit_s += time.perf_counter() - before
            wall = time.perf_counter() - started
            solved = sum(t.success for t in store.trajectories(stage="eval/bench"))
        live = [fleet.ensure(version, files) for version in (2, 3, 4)]
        fleet.close()
        rows.append((n, start_s, first_s, stats, wall, solved, statistics.median(live), commit_s))
        print(
            f"{n} actor(s): started in {start_s:.0f} s, first load {first_s:.1f} s; {stats.generated_tokens} tokens "
            f"in {wall:.1f} s ({stats.tokens_per_s:.1f} tokens/s), {solved}/{len(keys)} solved; new version live on "
            f"every actor in {', '.join(f'{s:.2f}' for s in live)} s; commits {commit_s:.2f} s",
            flush=True,
        )
    ray.shutdown()

    one = rows[0][3].tokens_per_s
    print(f"\n{args.backend}, {len(keys)} DB episodes, commit every {args.commit_every}")
    print(f"{'actors':>6}{'start s':>9}{'tokens/s':>10}{'vs 1':>7}{'solved':>8}{'live s':>8}{'commits % of stage':>20}")
    for n, start_s, _, stats, wall, solved, live, commit_s in rows:
        print(
            f"{n:>6}{start_s:>9.0f}{stats.tokens_per_s:>10.1f}{stats.tokens_per_s / one:>7.2f}"
            f"{solved:>5}/{len(keys):<2}{live:>8.2f}{commit_s / wall:>20.2%}"
        )


if __name__ == "__main__":
    main()
