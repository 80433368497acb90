"""Imagined OS tasks: proposals derived from training tasks, kept only when the real sandbox and
the training task's own check can score them, then scored by the real environment."""

from __future__ import annotations

import pytest
from os_helpers import CONFIG, SANDBOX_MARKS, answer, bash

from agentloop.envs import build_experts, load_tasks, make_env
from agentloop.envs.os.imagine import judge_evidence
from agentloop.memory.imagination import build, requests

pytestmark = SANDBOX_MARKS


@pytest.fixture(scope="module")
def bases(data_dir):
    train = load_tasks("os", data_dir, "train")
    integer = next(t for t in train if t.task.kind == "integer-match")
    text = next(t for t in train if t.task.kind == "string-match")
    return integer, text


def proposal(question: str, setup: str | None, solution: str) -> str:
    block = "" if setup is None else f"Setup:\n```bash\n{setup}\n```\n"
    return f"Here is one.\nTask: {question}\n{block}Solution:\n```bash\n{solution}\n```\n"


def test_a_derived_task_keeps_its_bases_check_and_the_env_scores_it(bases):
    integer, text = bases
    asked = requests([integer, text], lambda tasks: [[] for _ in tasks])
    assert "answer is an integer" in asked[0] and "answer is one line of text" in asked[1]
    assert integer.task.instruction in asked[0] and "Solution:\n```bash" in asked[0]
    texts = [
        proposal(
            "How many lines of ~/notes/todo.txt mention the word urgent?",
            "mkdir -p ~/notes\nprintf 'urgent: pay\\nlater\\nurgent: call\\nurgent: fix\\n' > ~/notes/todo.txt",
            "grep -c urgent ~/notes/todo.txt",
        ),
        proposal(
            "What is the first line of ~/motd.txt?",
            "printf 'welcome aboard\\nsecond\\n' > ~/motd.txt",
            "head -n 1 ~/motd.txt",
        ),
    ]
    proposals, tasks = build([integer, text], texts, {"os": CONFIG}, "imagine/1")
    assert [p.valid for p in proposals] == [True, True], [p.reason for p in proposals]
    count, line = tasks
    assert count.task.split == "imagined" and count.task.kind == "integer-match" and count.checks == integer.checks
    assert line.checks == text.checks and line.init[0].code.startswith("printf")

    # The environment scores them as it scores the training tasks: the answer against the solution's output.
    env = make_env("os", tasks, CONFIG)
    try:
        env.reset(options={"task_id": count.task.task_id})
        observation = env.step(bash("cat ~/notes/todo.txt"))[0]
        assert "urgent: call" in observation
        assert env.step(answer("3"))[1] == 1.0
        env.reset(options={"task_id": count.task.task_id})
        assert env.step(answer("4"))[1] == 0.0
        env.reset(options={"task_id": line.task.task_id})
        assert env.step(answer("welcome aboard"))[1] == 1.0
    finally:
        env.close()

    # What the judge reads, and the demonstration an accepted task gives (its solution, replayed).
    evidence = judge_evidence(count, CONFIG)
    assert "Task: How many lines" in evidence and "grep -c urgent" in evidence and "Its answer: '3'" in evidence
    demos, _ = build_experts("os", tasks, CONFIG, None, seed=0)
    assert [d.task for d in demos] == [count.task, line.task] and all(d.success for d in demos)


@pytest.mark.parametrize(
    ("setup", "solution", "reason"),
    [
        (None, "echo 42", "the solution prints a constant"),  # an answer the explorer knows before it asks
        ("printf 'a\\nb\\n' > ~/f", "wc -l < ~/f", "the task gives its answer away"),  # "2 lines" is in the question
        ("printf 'a\\n' > ~/f", "echo $RANDOM$$", "a different answer each time"),
        ("printf 'a\\n' > ~/f", "cat ~/missing", "fails or prints nothing"),
        ("printf 'abc\\n' > ~/f", "cat ~/f", "does not accept the solution's own answer"),  # not an integer
    ],
)
def test_proposals_the_sandbox_or_the_check_cannot_score_are_refused_with_the_reason(bases, setup, solution, reason):
    integer, _ = bases
    text = proposal("Count the 2 lines of ~/f: how many are there?", setup, solution)
    proposals, tasks = build([integer], [text], {"os": CONFIG}, "imagine/1")
    assert tasks == [] and not proposals[0].valid and reason in proposals[0].reason, proposals[0].reason
    unreadable, _ = build([integer], ["Task: something\nno solution"], {"os": CONFIG}, "imagine/1")
    assert unreadable[0].reason == "no Solution: ```bash block"


def test_the_example_task_copied_is_refused_and_the_same_question_on_new_files_is_not(bases):
    integer, _ = bases
    setup = "\n".join(s.code for s in integer.init if s.language == "bash")
    quoted = f'"{integer.task.instruction.upper()}"'  # a small explorer's copy: its quotes, another case
    copies = [proposal(quoted, None, "wc -l < ~/f"), proposal(quoted, setup, "wc -l < ~/f")]
    proposals, tasks = build([integer, integer], copies, {"os": CONFIG}, "imagine/1")
    assert tasks == [] and [p.reason for p in proposals] == ["the example task itself"] * 2
    # The same setup written otherwise (a comment added) still gives the example's answer: still a copy.
    if integer.example is not None:
        commented = proposal(integer.task.instruction, f"# prepared\n{setup}", integer.example.code)
        proposals, tasks = build([integer], [commented], {"os": CONFIG}, "imagine/1")
        assert tasks == [] and proposals[0].reason.startswith("the example task itself"), proposals[0].reason
    # The same question asked of other files is another task: it goes on to the sandbox's checks.
    fresh = proposal(integer.task.instruction, "printf 'a\\nb\\nc\\n' > ~/f", "wc -l < ~/f")
    proposals, _ = build([integer], [fresh], {"os": CONFIG}, "imagine/1")
    assert proposals[0].reason != "the example task itself"
