"""STE's ablation on agentloop: ETO alone, then STE's pieces added one by one, under the same budget.

    trunk (one per seed, by eto.py): experts, eval/base, SFT on the experts, eval/sft, with the
        rollout context STE's memory needs (its envs' context plus 768 tokens of memory: 2,816 on DB)
    each row: a copy of its seed's trunk, resumed for the same number of rounds on the same tasks
        eto          experiments/eto.py: one greedy pass per task, expert-vs-exploration pairs
        resample     experiments/ste.py with 3 trials per task and no memory: a failed task is tried
                     again, sampling (the control for memory), SFT on its successes and pairs among
                     its trials; no reflections, no replay
        trials       experiments/ste.py with 3 trials per task, short-term memory and reflections,
                     SFT on its successes and pairs among its trials; no long-term memory, no replay
        long_term    ... plus long-term memory, shown at every trial as STE's explorer is (ste.py's default
                     shows it to the retries only)
        imagined     ... plus imagined tasks
        full         ... plus replay of 10% of earlier rounds' data (SFT and DPO): STE+ETO
        late_memory  full, with long-term memory shown to the retries only: a task's first trial is
                     ETO's greedy pass (``memory.first_trial_memory=false``, ste.py's default). The 270M policy copies
                     other tasks' tables and values from the experiences shown at a first trial
        redraw       late_memory, with a retry's first turn drawn again (up to 4 times) while it repeats,
                     verbatim, an earlier trial's first action (``memory.redraws=4``): shown its failed
                     trial, the 270M policy began 70% of its retries with that trial's first action
        default      experiments/ste.py with its own defaults, what ``python experiments/ste.py`` runs after
                     its SFT: late_memory without imagined tasks (the 270M policy's are rarely valid)
    table: held-out success per row and env, k/n with a 95% Wilson interval, and an exact
        McNemar test against ``eto`` on the same tasks and seed; then each row's exploration of the
        training tasks in its first round (first trial, any trial), paired with ETO's greedy pass; for an env
        whose reward is graded (WebShop's), each row's mean held-out reward with paired permutation tests;
        with ``--compare A B``, row A against row B on each seed where both started from one trunk

Every row starts from the same SFT policy (its trunk's adapter and stages are copied), so rows
differ only in their rounds. Runs resume: a row or trunk already complete is not run again.

Usage:
    python experiments/ablation.py --out runs/ablation                       # all rows, seed 0
    python experiments/ablation.py --out runs/ablation --seeds 0 1 --rows eto full
    python experiments/ablation.py --out runs/ablation --table               # only the table, from what ran
    python experiments/ablation.py --out runs/ablation --table --compare redraw full   # and one row against another
    python experiments/ablation.py --out runs/ablation -- db.max_turns=4     # overrides for every run
    (overrides of STE's own sections, memory.*, imagine.*, mix.* and round_sft.*, go to its rows only)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
NO_REPLAY = ["round_sft.replay_fraction=0", "dpo.replay_fraction=0"]
EVERY_TRIAL = "memory.first_trial_memory=true"  # STE's design; ste.py's default shows memory to retries only
ROWS = {
    "eto": ("eto.py", ["dpo.replay_fraction=0"]),
    "resample": (
        "ste.py",
        ["memory.short_term_tokens=0", "memory.long_term_tokens=0", "memory.reflect=false", *NO_REPLAY],
    ),
    "trials": ("ste.py", ["memory.long_term_tokens=0", *NO_REPLAY]),
    "long_term": ("ste.py", [EVERY_TRIAL, *NO_REPLAY]),
    "imagined": ("ste.py", [EVERY_TRIAL, "imagine.tasks_per_env=50", *NO_REPLAY]),
    "full": ("ste.py", [EVERY_TRIAL, "imagine.tasks_per_env=50"]),
    "late_memory": ("ste.py", ["imagine.tasks_per_env=50", "memory.first_trial_memory=false"]),
    "redraw": ("ste.py", ["imagine.tasks_per_env=50", "memory.first_trial_memory=false", "memory.redraws=4"]),
    "default": ("ste.py", []),
}
"""Each row's experiment and the overrides that make it (on top of the defaults and ``--`` overrides)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory of the trunks, rows and table")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--iterations", type=int, default=2, help="rounds of every row")
    parser.add_argument("--table", action="store_true", help="only write the table of the runs that completed")
    parser.add_argument(
        "--records", type=Path, nargs="+", default=[],
        help="directories of records of earlier runs (another session's OUT/records) to add to the table",
    )  # fmt: skip
    parser.add_argument(
        "--compare", nargs=2, action="append", default=[], metavar=("ROW", "AGAINST"), choices=["sft", *ROWS],
        help="also pair ROW against AGAINST (held out, first trial, any trial), per seed; may be repeated",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (after --)")
    args = parser.parse_args(argv)
    if any(o.startswith(("store_url=", "run_dir=")) for o in args.overrides):
        raise SystemExit("store_url, run_dir: every run of the ablation keeps its own SQLite store in its directory")
    if not args.table:
        for seed in args.seeds:
            trunk = args.out / f"trunk-seed{seed}"
            shared = [f"seed={seed}", "iterations=0", f"rollout.max_context_tokens={rollout_context(args.overrides)}"]
            if record(args.out, "sft", seed, 0) is None:  # a complete trunk or row is not started again
                run(trunk, "eto.py", [*shared, *for_script("eto.py", args.overrides)])
            collect(args.out, [seed], [], args.iterations)  # each record is written as soon as it is complete
            for row in args.rows:
                script, overrides = ROWS[row]
                target = args.out / f"{row}-seed{seed}"
                fork(trunk, target)
                if record(args.out, row, seed, args.iterations) is None:
                    rounds = f"iterations={args.iterations}"
                    run(target, script, [rounds, *overrides, *for_script(script, args.overrides)])
                collect(args.out, [seed], [row], args.iterations)
    found = {(replicate(r), r["row"]): r for r in read_records(args.records, args.iterations)}
    found.update({(replicate(r), r["row"]): r for r in collect(args.out, args.seeds, args.rows, args.iterations)})
    table = ablation_table(list(found.values()), args.iterations, [tuple(pair) for pair in args.compare])
    args.out.mkdir(parents=True, exist_ok=True)  # --table from kept records alone: nothing ran here
    (args.out / "table.md").write_text(table)
    print(table)


STE_SECTIONS = ("memory", "imagine", "mix", "round_sft")


def rollout_context(overrides: list[str]) -> int:
    """Every run's rollout context: the largest its envs register, plus STE's memory budgets, so that ETO's
    rows play in the same context as STE's (DB with the default budgets: 2,048 + 512 + 256 = 2,816 tokens).
    A ``rollout.max_context_tokens`` among the overrides, given later, wins."""
    from ste import STEConfig

    from agentloop import envs
    from agentloop.config import load_config

    config = load_config(STEConfig, None, [o for o in overrides if not o.startswith("rollout.max_context_tokens=")])
    largest = max(envs.definition(spec.name).context_tokens for spec in config.envs)
    return largest + config.memory.short_term_tokens + config.memory.long_term_tokens


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
    """A new run directory holding the trunk's stages (:meth:`RunDir.fork`), unless it exists."""
    from agentloop.loop import RunDir

    if (target / "config.yaml").is_file():
        return
    shutil.rmtree(target, ignore_errors=True)  # a target left without its config.yaml holds nothing kept
    RunDir(trunk).fork(target)


def trunk_fingerprint(run_dir: Path) -> str:
    """The SFT policy a run started from: a hash of its ``adapters/sft`` weights (a row's are its trunk's copy);
    "" when they are gone (such a record is paired with no other)."""
    return fingerprint(run_dir / "adapters" / "sft")


def fingerprint(adapter: Path) -> str:
    """A hash of an adapter's weights; "" when there are none."""
    weights = sorted(adapter.glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in weights:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16] if weights else ""


def record(out: Path, row: str, seed: int, iterations: int) -> dict[str, Any] | None:
    """A completed row's outcomes task by task, or None while it is not complete (or ran another number of
    rounds): held-out success and reward after its rounds (the trunk, row ``sft``: after SFT), the SFT policy's
    held-out success and reward it started from, and its first exploration (first trial, any trial), with the
    trunk's fingerprint and the commits its starts recorded ("" for a run older than ``starts.jsonl``: the code
    reading it now is not the code that ran it). The trunk's record has ``iterations`` 0: it serves rows of any
    number of rounds."""
    from compare_exploration import outcomes

    from agentloop.loop import RunDir
    from agentloop.replay import ReplayStore

    path = out / f"{'trunk' if row == 'sft' else row}-seed{seed}"
    if not (path / "replay.db").is_file():
        return None
    if row != "sft" and yaml.safe_load((path / "config.yaml").read_text()).get("iterations") != iterations:
        return None
    stage = "eval/sft" if row == "sft" else f"eval/{iterations}"
    with ReplayStore(f"sqlite:///{(path / 'replay.db').resolve()}") as store:
        completed = store.completed_stages()
        if stage not in completed:
            return None
        played = {f"{t.task.env}/{t.task.task_id}": t for t in store.trajectories(stage=stage)}
        started = {f"{t.task.env}/{t.task.task_id}": t for t in store.trajectories(stage="eval/sft")}
    first, chain = outcomes(path, "explore/1")[:2] if "explore/1" in completed else ({}, {})
    return {
        "row": row, "seed": seed, "iterations": 0 if row == "sft" else iterations, "trunk": trunk_fingerprint(path),
        "commit": RunDir(path).commits(),  # the code that ran it, as its starts recorded ("": not recorded)
        "held_out": {key: t.success for key, t in played.items()},
        "held_out_reward": {key: t.reward for key, t in played.items()},
        "sft": {key: t.success for key, t in started.items()},
        "sft_reward": {key: t.reward for key, t in started.items()},
        "explore_first": first, "explore_any": chain,
    }  # fmt: skip


def collect(out: Path, seeds: list[int], rows: list[str], iterations: int) -> list[dict[str, Any]]:
    """The records of the trunks (row ``sft``) and rows completed under ``out``, each also written to
    ``out/records/`` (:func:`record_name`): small files to keep (commit them) where run directories do not last."""
    found = []
    for seed in seeds:
        for row in ["sft", *rows]:
            got = record(out, row, seed, iterations)
            if got is not None:
                target = out / "records" / record_name(got)
                kept = json.loads(target.read_text()) if target.is_file() else {}
                if all(kept.get(key) == got[key] for key in ("trunk", "held_out", "explore_any")):
                    got["commit"] = kept["commit"]  # written when the row completed: the code that ran it
                target.parent.mkdir(parents=True, exist_ok=True)
                staging = target.with_suffix(".json.tmp")
                staging.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
                os.replace(staging, target)
                found.append(got)
    return found


def record_name(found: dict[str, Any]) -> str:
    """``seed0-1a2b3c4d-sft.json`` for a trunk, ``seed0-1a2b3c4d-eto-1r.json`` for a row of one round from it:
    a seed's trunk trained again (on another machine) gets records of its own."""
    rounds = f"-{found['iterations']}r" if found["row"] != "sft" else ""
    return f"seed{found['seed']}-{found['trunk'][:8] or 'noadapter'}-{found['row']}{rounds}.json"


def read_records(directories: list[Path], iterations: int) -> list[dict[str, Any]]:
    """Records kept from earlier runs (``out/records`` of another machine or session, committed say) of the
    same number of rounds; records of other budgets are left out, and said so."""
    found = []
    for directory in directories:
        if not directory.is_dir():
            raise SystemExit(f"--records: no directory {directory}")
        for path in sorted(directory.glob("seed*-*.json")):
            got = json.loads(path.read_text())
            if got["row"] != "sft" and got["iterations"] != iterations:
                print(f"left out {path}: {got['iterations']} rounds, not {iterations}", file=sys.stderr)
                continue
            found.append(got)
    return found


def ablation_table(records: list[dict[str, Any]], iterations: int, compare: list[tuple[str, str]] | None = None) -> str:
    """The markdown tables from rows' records: per seed, row and env, held-out successes of the last round
    with exact McNemar tests against eto and against the SFT policy the row started from; each row's spread
    over seeds; then each row's first exploration against ETO's greedy pass; then, for each pair
    ``(row, against)`` of ``compare``, the same tests of one row against the other.

    Rows are paired only when both started from the same SFT policy (the same trunk fingerprint): a trunk
    trained again (on another machine, say) is a replicate of its own, its seed labelled with its trunk's
    hash, and its rows are told apart from the other trunk's ("other trunk" where the pair is across them).
    A later record of a (seed, trunk, row) replaces an earlier one."""
    from agentloop.metrics import wilson_interval

    order = ["sft", *ROWS]
    by = {(replicate(r), r["row"]): r for r in records}
    groups = sorted({group for group, _ in by})
    label = replicate_labels(groups)
    lines = [
        f"Held-out success after {iterations} rounds (stage eval/{iterations}; sft: eval/sft of the trunk). "
        "Exact McNemar tests on the same tasks and seed: gained/lost and p against eto (when it started from "
        "the same trunk), and p against sft.",
        "",
        "| seed | row | env | successes | rate | 95% CI | gained | lost | p vs eto | p vs sft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rates: dict[tuple[str, str], list[float]] = {}
    trunks: dict[tuple[int, str], list[str]] = {}  # rows per replicate (seed, trunk)
    for group in groups:
        eto = by.get((group, "eto"))
        for r in seed_records(by, group, order):
            trunks.setdefault(group, []).append(r["row"])
            for env in sorted({key.split("/", 1)[0] for key in r["held_out"]}):
                now = {k: v for k, v in r["held_out"].items() if k.startswith(env + "/")}
                k, n = sum(now.values()), len(now)
                low, high = wilson_interval(k, n)
                rates.setdefault((r["row"], env), []).append(k / n)
                vs_eto = ("-", "-", "-")
                if r["row"] not in ("eto", "sft") and (eto is not None or across(by, group, "eto")):
                    vs_eto = (
                        _paired(now, eto["held_out"], ".3f")
                        if eto and same_trunk(eto, r)
                        else ("-", "-", "other trunk")
                    )
                vs_sft = ("-", "-", "-") if r["row"] == "sft" else _paired(now, r["sft"], ".3f")
                lines.append(
                    f"| {label[group]} | {r['row']} | {env} | {k}/{n} | {k / n:.3f} | [{low:.3f}, {high:.3f}] "
                    f"| {' | '.join(vs_eto)} | {vs_sft[2]} |"
                )
    lines += [
        "",
        "Spread over seeds (and trunks):",
        "",
        "| row | env | runs | mean rate | min | max |",
        "|" + "---|" * 6,
    ]
    for (row, env), found_rates in rates.items():
        mean = sum(found_rates) / len(found_rates)
        lines.append(
            f"| {row} | {env} | {len(found_rates)} | {mean:.3f} | {min(found_rates):.3f} | {max(found_rates):.3f} |"
        )
    lines += reward_table([r for group in groups for r in seed_records(by, group, order)], by, label)
    lines += [
        "",
        "Exploration of the training tasks in round 1 (stage explore/1; imagined tasks left out): solved at the "
        "first trial, at any trial, and the exact McNemar test of any trial against ETO's greedy pass (the eto "
        "row, from the same trunk) on the same tasks.",
        "",
        "| seed | row | first trial | any trial | 95% CI | gained | lost | p vs eto's pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        eto = by.get((group, "eto"))
        for row in ROWS:
            r = by.get((group, row))
            if r is None or not r["explore_any"]:
                continue
            first, chain = r["explore_first"], r["explore_any"]
            k, n = sum(chain.values()), len(chain)
            low, high = wilson_interval(k, n)
            test = ("-", "-", "-")
            if (eto is not None or across(by, group, "eto")) and row != "eto":
                test = (
                    _paired(chain, eto["explore_any"], ".2g")
                    if eto and same_trunk(eto, r)
                    else ("-", "-", "other trunk")
                )
            lines.append(
                f"| {label[group]} | {row} | {sum(first.values())}/{len(first)} | {k}/{n} | [{low:.3f}, {high:.3f}] "
                f"| {' | '.join(test)} |"
            )
    if compare:
        lines += [
            "",
            "Row against row on the same seed and trunk, exact McNemar tests on the tasks both played: gained/lost "
            "and p, held out (last round), and in round 1's exploration at the first trial and at any trial.",
            "",
            "| seed | row | against | held out | gained | lost | p | first trial | gained | lost | p "
            "| any trial | gained | lost | p |",
            "|" + "---|" * 15,
        ]
    for row, against in compare or []:
        for group in groups:
            a, b = by.get((group, row)), by.get((group, against))
            if a is not None and against == "sft":  # every row carries its trunk's held-out outcomes
                b = {**a, "held_out": a["sft"], "explore_first": {}, "explore_any": {}}
            if a is None:
                continue
            if b is None or not same_trunk(a, b):
                if b is not None or across(by, group, against):  # ran, but from another trunk (or none known)
                    lines.append(f"| {label[group]} | {row} | {against} | other trunk |" + " - |" * 11)
                continue
            cells = []
            for key in ("held_out", "explore_first", "explore_any"):
                mine, theirs = a[key], b[key]
                if not mine or not theirs:
                    cells += ["-"] * 4
                    continue
                cells += [f"{sum(mine.values())} vs {sum(theirs.values())}", *_paired(mine, theirs, ".2g")]
            lines.append(f"| {label[group]} | {row} | {against} | {' | '.join(cells)} |")
    lines += ["", "Trunks (the SFT policy each row started from, by the hash of its adapter):", ""]
    for (seed, trunk), rows in trunks.items():
        lines.append(f"- seed {seed}, trunk {trunk}: {', '.join(rows)}")
    return "\n".join(lines) + "\n"


def replicate(found: dict[str, Any]) -> tuple[int, str]:
    """A record's replicate: its seed and the trunk it started from (a seed's trunk trained again is another)."""
    return found["seed"], found["trunk"]


def replicate_labels(replicates: list[tuple[int, str]]) -> dict[tuple[int, str], str]:
    """Each replicate's name in the tables: its seed, with its trunk's hash when the seed has several trunks."""
    seeds = [seed for seed, _ in replicates]
    return {
        (seed, trunk): str(seed) if seeds.count(seed) == 1 else f"{seed} ({trunk[:8] or 'no adapter'})"
        for seed, trunk in replicates
    }


def across(by: dict[tuple[tuple[int, str], str], dict[str, Any]], group: tuple[int, str], row: str) -> bool:
    """Whether ``row`` ran from another trunk of ``group``'s seed (not from ``group``'s own)."""
    return any(g[0] == group[0] and g != group and r == row for g, r in by)


def seed_records(by: dict[tuple[Any, str], dict[str, Any]], group: Any, order: list[str]) -> list[dict[str, Any]]:
    """One replicate's (seed and trunk's) records in table order, the trunk's (row ``sft``) first; when the trunk's
    own record is gone, one made from its rows' copy of its held-out outcomes and rewards."""
    mine = [by[group, row] for row in order if (group, row) in by]
    if (group, "sft") not in by and mine:
        as_trunk = {"row": "sft", "held_out": mine[0]["sft"], "held_out_reward": mine[0].get("sft_reward")}
        mine.insert(0, {**mine[0], **as_trunk})
    return mine


def reward_table(
    records: list[dict[str, Any]], by: dict[tuple[Any, str], dict[str, Any]], label: dict[tuple[int, str], str]
) -> list[str]:
    """Mean held-out reward per record (seed, row) and env, for the envs whose rewards are not only 0 and 1
    (WebShop's: a purchase that matches part of the goal), with paired permutation tests against eto and
    against the SFT policy the row started from; no lines when every env's reward is its success (DB, OS,
    ALFWorld), or the records predate rewards."""
    graded = {
        key.split("/", 1)[0]
        for r in records
        for key, reward in (r.get("held_out_reward") or {}).items()
        if reward not in (0.0, 1.0)
    }
    if not graded:
        return []
    lines = [
        "",
        "Mean held-out reward, for envs whose reward is graded (paired permutation tests of the mean difference on "
        "the same tasks and seed: against eto when it started from the same trunk, and against sft).",
        "",
        "| seed | row | env | mean reward | vs eto | p vs eto | vs sft | p vs sft |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        group, row, eto = replicate(r), r["row"], by.get((replicate(r), "eto"))
        for env in sorted(graded):
            now = {k: v for k, v in (r.get("held_out_reward") or {}).items() if k.startswith(env + "/")}
            if not now:
                continue
            cells = ["-", "-"]
            if row not in ("eto", "sft") and eto is not None and eto.get("held_out_reward"):
                cells = _paired_reward(now, eto["held_out_reward"]) if same_trunk(eto, r) else ["-", "other trunk"]
            elif row not in ("eto", "sft") and across(by, group, "eto"):
                cells = ["-", "other trunk"]
            cells += ["-", "-"] if row == "sft" or not r.get("sft_reward") else _paired_reward(now, r["sft_reward"])
            lines.append(
                f"| {label[group]} | {row} | {env} | {sum(now.values()) / len(now):.3f} | {' | '.join(cells)} |"
            )
    return lines


def _paired_reward(now: dict[str, float], before: dict[str, float]) -> list[str]:
    """The mean reward's difference and its paired permutation p, on the tasks both played, as table cells."""
    from agentloop.metrics import paired_rewards

    tasks, mean_before, mean_after, p = paired_rewards(before, now)
    if not tasks:
        return ["-", "-"]
    return [f"{mean_after - mean_before:+.3f}", f"{p:.3f}" + (f" (on {tasks})" if tasks < len(now) else "")]


def same_trunk(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records started from the same SFT policy (a record without its adapter's hash pairs with none)."""
    return bool(a["trunk"]) and a["trunk"] == b["trunk"]


def _paired(now: dict[str, bool], before: dict[str, bool], p_format: str) -> tuple[str, str, str]:
    """Gained, lost and the exact McNemar p of ``now`` against ``before`` on the tasks both played, as table
    cells; the p says on how many tasks when that is fewer than ``now`` holds, and is "-" when none."""
    from agentloop.metrics import paired_outcomes

    tasks, gained, lost, p = paired_outcomes(before, now)
    if not tasks:
        return "-", "-", "-"
    return str(gained), str(lost), format(p, p_format) + (f" (on {tasks})" if tasks < len(now) else "")


if __name__ == "__main__":
    main()
