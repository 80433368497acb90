"""Exploration stages compared task by task: a run's first trials against its chains of trials,
and both against another run's exploration of the same tasks (ETO's greedy pass, say).

    python experiments/compare_exploration.py RUN_DIR [BASELINE_RUN_DIR] [--stage explore/1]
    python experiments/compare_exploration.py RUN_DIR BASELINE_RUN_DIR --stage eval/1   # held-out, paired
    python experiments/compare_exploration.py runs/continual-replay runs/continual-noreplay --stage eval/sft-2
    python experiments/compare_exploration.py runs/family-replay runs/family-replay --stage eval/sft-2 \
        --baseline-stage eval/sft-1 --families        # forgetting within a run: each task family, paired

Prints, per trial number, the trials played and solved; how many retries began with the very action
their task's previous trial began with (a small policy shown its failed trial tends to repeat it); how
many first trials shown long-term memory began by quoting a name or value found only in the memory (copied
from another task's experience); then
successes k/n with a 95% Wilson interval and an exact McNemar test (gained, lost, p) on the tasks both
sides played, and per env when there are several; with ``--families``, per task family (env and kind) too.
The baseline may be another stage (``--baseline-stage``), of the same run or of another: the same held-out
tasks after phase 1 and after phase 2 of a continual run tell which of them were forgotten.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from agentloop.memory.short_term import repeated_retries
from agentloop.metrics import paired_outcomes, wilson_interval
from agentloop.replay import ReplayStore
from agentloop.types import Trajectory


def explored(run_dir: Path, stage: str) -> list[Trajectory]:
    """The stage's trajectories of training tasks (imagined tasks left out), in trial order per task."""
    with ReplayStore(f"sqlite:///{run_dir / 'replay.db'}") as store:
        found = [t for t in store.trajectories(stage=stage) if t.task.split != "imagined"]
    return sorted(found, key=lambda t: (t.task.key, t.trial))


def outcomes(run_dir: Path, stage: str) -> tuple[dict[str, bool], dict[str, bool], dict[int, list[int]]]:
    """Per task key: solved at its first trial, solved at any trial; per trial number: [played, solved]."""
    return tally(explored(run_dir, stage))


def tally(trajectories: list[Trajectory]) -> tuple[dict[str, bool], dict[str, bool], dict[int, list[int]]]:
    """:func:`outcomes` of trajectories already read."""
    first, chain, trials = {}, {}, {}
    for t in trajectories:
        if t.trial == 0:
            first[t.task.key] = t.success
        chain[t.task.key] = chain.get(t.task.key, False) or t.success
        counts = trials.setdefault(t.trial, [0, 0])
        counts[0] += 1
        counts[1] += t.success
    return first, chain, trials


QUOTED = re.compile(r""""([^"]+)"|'([^']+)'""")
"""A quoted name or value in an action: a table, a column, a string."""


def copied_from_memory(trajectories: list[Trajectory]) -> tuple[int, int, int, int]:
    """First trials shown long-term memory: how many, how many began with an action quoting a name or value
    that the memory holds and the task's own prompt does not (copied from another task), how many of those
    solved their task, and how many of the others did."""
    shown = [t for t in trajectories if t.trial == 0 and t.memory]
    copied = []
    for t in shown:
        prompt = t.messages[0].content.replace(t.memory, "")
        action = next((m.content for m in t.messages if m.role == "assistant"), "")
        quoted = {a or b for a, b in QUOTED.findall(action)}
        if any(q in t.memory and q not in prompt for q in quoted):
            copied.append(t)
    solved = sum(t.success for t in copied)
    return len(shown), len(copied), solved, sum(t.success for t in shown) - solved


def paired(before: dict[str, bool], after: dict[str, bool], name: str) -> str:
    tasks, gained, lost, p = paired_outcomes(before, after)
    k_before, k_after = sum(before[k] for k in after if k in before), sum(after[k] for k in after if k in before)
    low, high = wilson_interval(k_after, tasks)
    return (
        f"{name}: {k_before} -> {k_after}/{tasks} (95% CI [{low:.1%}, {high:.1%}]); "
        f"gained {gained}, lost {lost}, exact McNemar p = {p:.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("baseline", type=Path, nargs="?")
    parser.add_argument("--stage", default="explore/1")
    parser.add_argument("--baseline-stage", help="the baseline's stage (default: --stage)")
    parser.add_argument("--families", action="store_true", help="also pair each task family (env and kind) apart")
    args = parser.parse_args(argv)
    trajectories = explored(args.run, args.stage)
    first, chain, trials = tally(trajectories)
    print("trials (solved/played): " + ", ".join(f"{n}: {s}/{p}" for n, (p, s) in sorted(trials.items())))
    retries, same, solved = repeated_retries(trajectories)
    print(f"retries beginning with their previous trial's first action: {same}/{retries} ({solved} of them solved)")
    shown, copied, solved, others = copied_from_memory(trajectories)
    print(f"first trials shown long-term memory whose first action quotes a name or value found only in it: "
          f"{copied}/{shown} ({solved} of them solved; {others}/{shown - copied} of the others)")  # fmt: skip
    print(paired(first, chain, "first trial -> any trial"))
    if args.baseline is not None:
        baseline, _, _ = outcomes(args.baseline, args.baseline_stage or args.stage)
        groups = {t.task.key: t.task.env for t in trajectories}
        if args.families:
            groups.update({t.task.key: f"{t.task.env}:{t.task.kind}" for t in trajectories})
        for name, now in (("first trial", first), ("any trial", chain)):
            print(paired(baseline, now, f"baseline -> {name}"))
            apart = sorted(set(groups.values()))
            for group in apart if len(apart) > 1 else ():  # several envs or families (a continual run's): each apart
                mine = {key: ok for key, ok in now.items() if groups[key] == group}
                if any(key in baseline for key in mine):  # a group the baseline never played: nothing to pair
                    print("  " + paired(baseline, mine, f"{group}: baseline -> {name}"))


if __name__ == "__main__":
    main()
