"""The forgetting table of continual runs (experiments/continual.py): what each run's later phases made it
lose of what its earlier phases taught, with and without replay, task by task.

    each run's record: its replay shares, phases, seed and epochs, the fingerprint of its phase-1 policy,
        and every held-out evaluation's outcome per task (small JSON files: commit them, as run
        directories do not outlive a machine)
    table, per run and per env or task family of an earlier phase, at the run's last evaluation:
        success k/n with a 95% Wilson interval; the end of that unit's own phase -> now, gained / lost
        with an exact McNemar test; forgetting in points (its best at an earlier evaluation - now, as
        continual.py logs it, negative when it rose); and, paired on the same tasks, the run against
        the baseline run (without replay), when both grew from the same phase-1 policy (a fork of one
        run, as the README's sweep does); the env or family its last phase trained, for what replay cost it

Usage:
    python experiments/forgetting_table.py runs/family-noreplay runs/family-replay-0.1 --baseline family-noreplay \\
        --out results/forgetting-db          # records of the runs written there, and the table
    python experiments/forgetting_table.py --records results/forgetting-db --baseline family-noreplay  # from records
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import yaml


def record(run_dir: Path, ran_at: str = "") -> dict[str, Any]:
    """A continual run's record: its settings, phase-1 fingerprint, and each completed held-out evaluation's
    success per task, in the order the stages completed; each task's unit (``env:kind``); the commit of the code
    that ran it: ``ran_at``, else the commits its starts recorded (``starts.jsonl``, comma-separated when a resume
    ran other code), else "" (runs made before starts were recorded)."""
    from ablation import fingerprint

    from agentloop.loop import RunDir
    from agentloop.replay import ReplayStore

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    stages: dict[str, dict[str, bool]] = {}
    kinds: dict[str, str] = {}
    with ReplayStore(f"sqlite:///{(run_dir / 'replay.db').resolve()}") as store:
        for stage in (s for s in store.completed_stages() if s.startswith("eval/")):
            played = store.trajectories(stage=stage)
            stages[stage] = {t.task.key: t.success for t in sorted(played, key=lambda t: t.task.key)}
            kinds |= {t.task.key: f"{t.task.env}:{t.task.kind}" for t in played}
    return {
        "name": run_dir.name, "commit": ran_at or RunDir(run_dir).commits(), "seed": config["seed"],
        "phases": config["phases"], "iterations": config["iterations"], "sft_epochs": config["sft"]["epochs"],
        "replay": {key: config[key]["replay_fraction"] for key in ("sft", "round_sft", "dpo")},
        "phase1": fingerprint(run_dir / "adapters" / "sft-1"), "kinds": kinds, "stages": stages,
    }  # fmt: skip


def write_records(run_dirs: list[Path], out: Path, ran_at: str = "") -> list[dict[str, Any]]:
    """Each run's record, written whole (or not at all) to ``out/<run name>.json``."""
    found = []
    out.mkdir(parents=True, exist_ok=True)
    for run_dir in run_dirs:
        got = record(run_dir, ran_at)
        staging = out / f"{got['name']}.json.tmp"
        staging.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        os.replace(staging, out / f"{got['name']}.json")
        found.append(got)
    return found


def read_records(directory: Path) -> list[dict[str, Any]]:
    if not directory.is_dir():
        raise SystemExit(f"--records: no directory {directory}")
    return [json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))]


def phase_end(found: dict[str, Any], phase: int) -> str:
    """The evaluation that closed ``phase`` (1-based): after its SFT, or after its last STE round."""
    rounds = found["iterations"]
    return f"eval/sft-{phase}" if rounds == 0 else f"eval/{phase * rounds}"


def forgetting_table(records: list[dict[str, Any]], baseline: str | None = None) -> str:
    """The markdown table (see the module's docstring); runs by replay share, then name."""
    from agentloop.metrics import paired_outcomes, wilson_interval

    base = next((r for r in records if r["name"] == baseline), None)
    if baseline is not None and base is None:
        raise SystemExit(f"--baseline: no run named {baseline} among {[r['name'] for r in records]}")
    lines = [
        "| run | replay (sft / round_sft / dpo) | env or family | end of its phase | now (95% CI) | gained / lost, p"
        " | forgetting (points) | against the baseline: gained / lost, p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for found in sorted(records, key=lambda r: (r["replay"]["sft"], r["name"])):
        last = list(found["stages"])[-1]
        now = found["stages"][last]
        shares = " / ".join(f"{found['replay'][key]:g}" for key in ("sft", "round_sft", "dpo"))
        paired_with = base if base is not None and base is not found and base["phase1"] == found["phase1"] else None
        for phase, units in enumerate(found["phases"], start=1):
            earlier = phase < len(found["phases"])  # what a later phase may have made it forget
            ended = found["stages"].get(phase_end(found, phase), {})
            for unit in units:
                keys = sorted(key for key in now if _belongs(found["kinds"][key], unit))
                k, n = sum(now[key] for key in keys), len(keys)
                low, high = wilson_interval(k, n)
                mine = {key: now[key] for key in keys}
                cells = ["", "(trained last)", ""]
                if earlier:
                    _, gained, lost, p = paired_outcomes(ended, mine)
                    before = (stage for name, stage in found["stages"].items() if name != last)
                    best = max((sum(stage.get(key, False) for key in keys) for stage in before), default=k)
                    cells = [f"{sum(ended.get(key, False) for key in keys)}/{n}", f"{gained} / {lost}, {p:.2g}",
                             f"{100 * (best - k) / max(n, 1):.0f}"]  # fmt: skip
                against = ""
                if paired_with is not None and last in paired_with["stages"]:
                    _, up, down, q = paired_outcomes(paired_with["stages"][last], mine)
                    against = f"{up} / {down}, {q:.2g}"
                lines.append(
                    f"| {found['name']} | {shares} | {unit} | {cells[0]} | {k}/{n} [{low:.0%}, {high:.0%}]"
                    f" | {cells[1]} | {cells[2]} | {against} |"
                )
    return "\n".join(lines) + "\n"


def _belongs(task_unit: str, unit: str) -> bool:
    """Whether a task of ``task_unit`` (``env:kind``) is in ``unit``, as continual.py decides it."""
    from types import SimpleNamespace

    from continual import belongs

    env, _, kind = task_unit.partition(":")
    return belongs(SimpleNamespace(env=env, kind=kind), [unit])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="*", help="continual.py run directories")
    parser.add_argument("--out", type=Path, help="where to write the runs' records (and the table, table.md)")
    parser.add_argument("--records", type=Path, nargs="*", default=[], help="directories of records kept earlier")
    parser.add_argument("--commit", default="", help="the code that ran the runs (default: their starts')")
    parser.add_argument("--baseline", help="the name of the run the others are paired against (without replay)")
    args = parser.parse_args(argv)
    if args.runs and args.out is None:
        parser.error("runs given: --out is where their records go")
    found = {r["name"]: r for directory in args.records for r in read_records(directory)}
    found |= {r["name"]: r for r in (write_records(args.runs, args.out, args.commit) if args.runs else [])}
    if not found:
        parser.error("no run and no record: nothing to tabulate")
    table = forgetting_table(list(found.values()), args.baseline)
    if args.out is not None:
        (args.out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
