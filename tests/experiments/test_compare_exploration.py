"""experiments/compare_exploration.py: first trials, chains and a baseline's pass, task by task, from real stores."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from records import episode

from agentloop.replay import ReplayStore
from agentloop.types import Message, Task, Trajectory

REPO = Path(__file__).resolve().parents[2]


def _trial(task_id: str, trial: int, success: bool) -> Trajectory:
    task = Task("db", task_id, "train", "SELECT", f"question {task_id}")
    return episode(task, success=success, action="Action: Answer\nFinal Answer: []", trial=trial)


def _run(run_dir: Path, trajectories: list[Trajectory]) -> Path:
    run_dir.mkdir()
    with ReplayStore(f"sqlite:///{run_dir / 'replay.db'}") as store:
        store.add(trajectories, "explore/1")
    return run_dir


def test_first_trials_chains_and_a_baseline_are_compared_on_the_same_tasks(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import compare_exploration

    # a: solved at once; b: solved at its second trial; c: never; d: only the baseline explored it.
    ste = _run(
        tmp_path / "ste", [_trial("a", 0, True), _trial("b", 0, False), _trial("b", 1, True), _trial("c", 0, False)]
    )
    eto = _run(
        tmp_path / "eto", [_trial("a", 0, False), _trial("b", 0, False), _trial("c", 0, True), _trial("d", 0, True)]
    )
    compare_exploration.main([str(ste), str(eto)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "trials (solved/played): 0: 1/3, 1: 1/1"
    assert lines[1] == "retries beginning with their previous trial's first action: 1/1 (1 of them solved)"
    assert lines[2].endswith("found only in it: 0/0 (0 of them solved; 0/0 of the others)")  # no memory shown
    assert lines[3].startswith("first trial -> any trial: 1 -> 2/3 ") and "gained 1, lost 0" in lines[3]
    assert lines[4].startswith("baseline -> first trial: 1 -> 1/3 ") and "gained 1, lost 1" in lines[4]
    assert lines[5].startswith("baseline -> any trial: 1 -> 2/3 ") and "gained 2, lost 1" in lines[5]


def test_a_retry_that_begins_otherwise_is_not_a_repeat():
    sys.path.insert(0, str(REPO / "experiments"))
    import compare_exploration

    first, retry = _trial("a", 0, False), _trial("a", 1, False)
    other = Message("assistant", "Action: Operation\n```sql\nSELECT 1;\n```")
    retry = replace(retry, messages=(retry.messages[0], other))
    assert compare_exploration.repeated_retries([first, retry, _trial("b", 0, True)]) == (1, 0, 0)


def test_first_trials_that_quote_what_only_their_memory_holds_are_counted_as_copied():
    sys.path.insert(0, str(REPO / "experiments"))
    import compare_exploration

    memory = "Experience from similar tasks:\n- Task: add a prize. Actions: "
    memory += 'INSERT INTO "awards" ("Year") VALUES (\'2019\')\n'

    def first_trial(task_id: str, action: str, success: bool, shown: str = memory) -> Trajectory:
        prompt = Message("user", shown + 'Table: "results", columns: "Name", "Year"')
        return replace(_trial(task_id, 0, success), messages=(prompt, Message("assistant", action)), memory=shown)

    trials = [
        first_trial("a", 'INSERT INTO "awards" ("Year") VALUES (\'2019\');', False),  # another task's table
        first_trial("b", 'SELECT "Name" FROM "results" WHERE "Year" = \'2019\';', True),  # '2019' only in memory
        first_trial("c", 'SELECT "Name" FROM "results";', True),  # its own names only
        first_trial("d", 'SELECT "awards" FROM "results";', False, shown=""),  # no memory shown: not counted
        replace(first_trial("a", 'INSERT INTO "awards" ("Year") VALUES (1);', False), trial=1),  # a retry
    ]
    assert compare_exploration.copied_from_memory(trials) == (3, 2, 1, 1)


def test_held_out_stages_of_several_envs_are_also_paired_per_env(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import compare_exploration

    def played(env: str, task_id: str, success: bool) -> Trajectory:
        found = _trial(task_id, 0, success)
        return replace(found, task=replace(found.task, env=env), source="eval")

    def run(name: str, outcomes: list[tuple[str, str, bool]]) -> Path:
        (tmp_path / name).mkdir()
        with ReplayStore(f"sqlite:///{tmp_path / name / 'replay.db'}") as store:
            store.add([played(*each) for each in outcomes], "eval/sft-2")
        return tmp_path / name

    replay = run("replay", [("db", "1", True), ("db", "2", True), ("os", "1", False)])
    no_replay = run("no-replay", [("db", "1", False), ("db", "2", True), ("os", "1", True)])
    compare_exploration.main([str(replay), str(no_replay), "--stage", "eval/sft-2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].startswith("baseline -> first trial: 2 -> 2/3 ") and "gained 1, lost 1" in lines[4]
    assert lines[5].startswith("  db: baseline -> first trial: 1 -> 2/2 ") and "gained 1, lost 0" in lines[5]
    assert lines[6].startswith("  os: baseline -> first trial: 1 -> 0/1 ") and "gained 0, lost 1" in lines[6]


def test_a_run_against_its_own_earlier_stage_pairs_each_task_family(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import compare_exploration

    def played(kind: str, task_id: str, success: bool) -> Trajectory:
        found = _trial(task_id, 0, success)
        return replace(found, task=replace(found.task, kind=kind), source="eval")

    (tmp_path / "run").mkdir()
    with ReplayStore(f"sqlite:///{tmp_path / 'run' / 'replay.db'}") as store:  # UPDATE forgotten, INSERT learnt
        before = [played("UPDATE", "1", True), played("UPDATE", "2", True), played("INSERT", "3", False)]
        store.add(before, "eval/sft-1")
        after = [played("UPDATE", "1", False), played("UPDATE", "2", True), played("INSERT", "3", True)]
        store.add(after, "eval/sft-2")
    run = str(tmp_path / "run")
    compare_exploration.main([run, run, "--stage", "eval/sft-2", "--baseline-stage", "eval/sft-1", "--families"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[4].startswith("baseline -> first trial: 2 -> 2/3 ") and "gained 1, lost 1" in lines[4]
    assert lines[5].startswith("  db:INSERT: baseline -> first trial: 0 -> 1/1 ") and "gained 1, lost 0" in lines[5]
    assert lines[6].startswith("  db:UPDATE: baseline -> first trial: 2 -> 1/2 ") and "gained 0, lost 1" in lines[6]
    compare_exploration.main([run, run, "--stage", "eval/sft-2", "--baseline-stage", "eval/sft-1"])
    assert not capsys.readouterr().out.splitlines()[5].startswith("  ")  # one env and no --families: no groups
