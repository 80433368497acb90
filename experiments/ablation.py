"""STE's ablation on agentloop: ETO alone, then STE's pieces added one by one, under the same budget.

    trunk (one per seed, by eto.py): experts, eval/base, SFT on the experts, eval/sft, with the
        rollout context STE's memory needs (2,816 tokens: the DB's 2,048 plus 768 of memory)
    each row: a copy of its seed's trunk, resumed for the same number of rounds on the same tasks
        eto          experiments/eto.py: one greedy pass per task, expert-vs-exploration pairs
        resample     experiments/ste.py with 3 trials per task and no memory: a failed task is tried
                     again, sampling (the control for memory), SFT on its successes and pairs among
                     its trials; no reflections, no replay
        trials       experiments/ste.py with 3 trials per task, short-term memory and reflections,
                     SFT on its successes and pairs among its trials; no long-term memory, no replay
        long_term    ... plus long-term memory
        imagined     ... plus imagined tasks
        full         ... plus replay of 10% of earlier rounds' data (SFT and DPO): STE+ETO
        late_memory  full, with long-term memory shown to the retries only: a task's first trial is
                     ETO's greedy pass (``memory.first_trial_memory=false``). The 270M policy copies
                     other tasks' tables and values from the experiences shown at a first trial
    table: held-out success per row and env, k/n with a 95% Wilson interval, and an exact
        McNemar test against ``eto`` on the same tasks and seed; then each row's exploration of the
        training tasks in its first round (first trial, any trial), paired with ETO's greedy pass

Every row starts from the same SFT policy (its trunk's adapter and stages are copied), so rows
differ only in their rounds. Runs resume: a row or trunk already complete is not run again.

Usage:
    python experiments/ablation.py --out runs/ablation                       # all rows, seed 0
    python experiments/ablation.py --out runs/ablation --seeds 0 1 --rows eto full
    python experiments/ablation.py --out runs/ablation --table               # only the table, from what ran
    python experiments/ablation.py --out runs/ablation -- db.max_turns=4     # overrides for every run
    (overrides of STE's own sections, memory.*, imagine.*, mix.* and round_sft.*, go to its rows only)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CONTEXT = 2816
"""Every row's rollout context: the DB's 2,048 tokens and STE's default memory budgets (512 + 256)."""
NO_REPLAY = ["round_sft.replay_fraction=0", "dpo.replay_fraction=0"]
ROWS = {
    "eto": ("eto.py", ["dpo.replay_fraction=0"]),
    "resample": (
        "ste.py",
        ["memory.short_term_tokens=0", "memory.long_term_tokens=0", "memory.reflect=false", *NO_REPLAY],
    ),
    "trials": ("ste.py", ["memory.long_term_tokens=0", *NO_REPLAY]),
    "long_term": ("ste.py", NO_REPLAY),
    "imagined": ("ste.py", ["imagine.tasks_per_env=50", *NO_REPLAY]),
    "full": ("ste.py", ["imagine.tasks_per_env=50"]),
    "late_memory": ("ste.py", ["imagine.tasks_per_env=50", "memory.first_trial_memory=false"]),
}
"""Each row's experiment and the overrides that make it (on top of the defaults and ``--`` overrides)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory of the trunks, rows and table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--iterations", type=int, default=2, help="rounds of every row")
    parser.add_argument("--table", action="store_true", help="only write the table of the runs that completed")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args(argv)
    if any(o.startswith(("store_url=", "run_dir=")) for o in args.overrides):
        raise SystemExit("store_url, run_dir: every run of the ablation keeps its own SQLite store in its directory")
    if not args.table:
        for seed in args.seeds:
            trunk = args.out / f"trunk-seed{seed}"
            shared = [f"seed={seed}", "iterations=0", f"rollout.max_context_tokens={CONTEXT}"]
            run(trunk, "eto.py", [*shared, *for_script("eto.py", args.overrides)])
            for row in args.rows:
                script, overrides = ROWS[row]
                target = args.out / f"{row}-seed{seed}"
                fork(trunk, target)
                run(target, script, [f"iterations={args.iterations}", *overrides, *for_script(script, args.overrides)])
    table = ablation_table(args.out, args.seeds, args.rows, args.iterations)
    (args.out / "table.md").write_text(table)
    print(table)


STE_SECTIONS = ("memory", "imagine", "mix", "round_sft")


def for_script(script: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to ``script``: eto.py has none of STE's sections."""
    return [o for o in overrides if script != "eto.py" or o.split(".", 1)[0].split("=", 1)[0] not in STE_SECTIONS]


def run(run_dir: Path, script: str, overrides: list[str]) -> None:
    """Runs (or resumes) one experiment into ``run_dir``; its output goes to ``run_dir``.log."""
    resume = (run_dir / "config.yaml").is_file()
    args = ["--resume", str(run_dir)] if resume else [f"run_dir={run_dir}"]
    command = [sys.executable, str(HERE / script), *args, *overrides]
    print(("resuming " if resume else "starting ") + " ".join(command[1:]), flush=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.log", "a") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed for {run_dir} (exit {done.returncode}); see {run_dir}.log")


def fork(trunk: Path, target: Path) -> None:
    """A new run directory holding the trunk's stages (store, adapters, metrics), unless it exists.

    Made whole or not at all: copied beside the target, then renamed into place. The store is
    copied with SQLite's backup API, so what the trunk committed is there even if its
    write-ahead log was never checkpointed.
    """
    import sqlite3

    if (target / "config.yaml").is_file():
        return
    staging = target.with_name(target.name + ".forking")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(trunk, staging, ignore=shutil.ignore_patterns("tensorboard", "*.png", "replay.db*"))
    source, copy = sqlite3.connect(trunk / "replay.db"), sqlite3.connect(staging / "replay.db")
    with copy:
        source.backup(copy)
    source.close()
    copy.close()
    config = yaml.safe_load((staging / "config.yaml").read_text())
    config["run_dir"] = str(target)
    (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(target, ignore_errors=True)  # a target left without its config.yaml holds nothing kept
    os.replace(staging, target)


def ablation_table(out: Path, seeds: list[int], rows: list[str], iterations: int) -> str:
    """The markdown tables: per seed, row and env, held-out successes of the last round with exact
    McNemar tests against eto and against the SFT policy the row started from; then, per row and
    env, the spread over seeds."""
    from agentloop.metrics import mcnemar_exact, wilson_interval

    lines = [
        f"Held-out success after {iterations} rounds (stage eval/{iterations}; sft: eval/sft of the trunk). "
        "Exact McNemar tests on the same tasks and seed: gained/lost and p against eto, and p against sft.",
        "",
        "| seed | row | env | successes | rate | 95% CI | gained | lost | p vs eto | p vs sft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rates: dict[tuple[str, str], list[float]] = {}
    for seed in seeds:
        found = _outcomes(out, seed, rows, iterations)
        for row, outcomes in found.items():
            for env in sorted({e for e, _ in outcomes}):
                mine = {k: v for k, v in outcomes.items() if k[0] == env}
                k, n = sum(mine.values()), len(mine)
                low, high = wilson_interval(k, n)
                rates.setdefault((row, env), []).append(k / n)
                against = {}
                for other in ("eto", "sft"):
                    paired = [(found[other][key], v) for key, v in mine.items() if key in found.get(other, {})]
                    gained = sum(now and not was for was, now in paired)
                    lost = sum(was and not now for was, now in paired)
                    baseline = row in (other, "sft")  # sft is every row's starting point, eto the other baseline
                    against[other] = (gained, lost, mcnemar_exact(gained, lost)) if paired and not baseline else None
                eto, sft = against["eto"], against["sft"]
                lines.append(
                    f"| {seed} | {row} | {env} | {k}/{n} | {k / n:.3f} | [{low:.3f}, {high:.3f}] "
                    + (f"| {eto[0]} | {eto[1]} | {eto[2]:.3f} " if eto else "| - | - | - ")
                    + (f"| {sft[2]:.3f} |" if sft else "| - |")
                )
    lines += ["", "Spread over seeds:", "", "| row | env | seeds | mean rate | min | max |", "|" + "---|" * 6]
    for (row, env), found_rates in rates.items():
        mean = sum(found_rates) / len(found_rates)
        lines.append(
            f"| {row} | {env} | {len(found_rates)} | {mean:.3f} | {min(found_rates):.3f} | {max(found_rates):.3f} |"
        )
    lines += [
        "",
        "Exploration of the training tasks in round 1 (stage explore/1; imagined tasks left out): solved at the "
        "first trial, at any trial, and the exact McNemar test of any trial against ETO's greedy pass (the eto "
        "row) on the same tasks.",
        "",
        "| seed | row | first trial | any trial | 95% CI | gained | lost | p vs eto's pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed in seeds:
        explored = _explored(out, seed, rows)
        greedy = explored.get("eto", ({}, {}))[1]
        for row, (first, chain) in explored.items():
            k, n = sum(chain.values()), len(chain)
            low, high = wilson_interval(k, n)
            keys = sorted(set(chain) & set(greedy))
            gained = sum(chain[t] and not greedy[t] for t in keys)
            lost = sum(greedy[t] and not chain[t] for t in keys)
            test = "| - | - | - |"
            if keys and row != "eto":
                test = f"| {gained} | {lost} | {mcnemar_exact(gained, lost):.2g} |"
            lines.append(
                f"| {seed} | {row} | {sum(first.values())}/{len(first)} | {k}/{n} | [{low:.3f}, {high:.3f}] {test}"
            )
    return "\n".join(lines) + "\n"


def _explored(out: Path, seed: int, rows: list[str]) -> dict[str, tuple[dict[str, bool], dict[str, bool]]]:
    """Each row's completed first exploration: per training task, solved at its first trial, at any trial."""
    from compare_exploration import outcomes

    from agentloop.replay import ReplayStore

    found = {}
    for row in rows:
        path = out / f"{row}-seed{seed}"
        if not (path / "replay.db").is_file():
            continue
        with ReplayStore(f"sqlite:///{(path / 'replay.db').resolve()}") as store:
            if "explore/1" not in store.completed_stages():
                continue
        first, chain, _ = outcomes(path, "explore/1")
        found[row] = (first, chain)
    return found


def _outcomes(out: Path, seed: int, rows: list[str], iterations: int) -> dict[str, dict[tuple[str, str], bool]]:
    """Each completed row's held-out outcome per (env, task id), with the trunk's SFT evaluation as ``sft``."""
    from agentloop.replay import ReplayStore

    found = {}
    for row in ["sft", *rows]:
        path = out / f"{'trunk' if row == 'sft' else row}-seed{seed}" / "replay.db"
        if not path.is_file():
            continue
        stage = "eval/sft" if row == "sft" else f"eval/{iterations}"
        with ReplayStore(f"sqlite:///{path.resolve()}") as store:
            if stage in store.completed_stages():
                found[row] = {(t.task.env, t.task.task_id): t.success for t in store.trajectories(stage=stage)}
    return found


if __name__ == "__main__":
    main()
