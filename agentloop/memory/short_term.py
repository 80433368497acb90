"""Short-term memory: a task's earlier trials, shown to its next one within a token budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agentloop.types import Experience, Trajectory

ACTION_CHARS = 400
"""Longest action quoted from an earlier trial (longer ones are cut in the middle)."""
RESULT_CHARS = 240
"""Longest environment reply quoted from an earlier trial."""

HEADER = "Your earlier attempts at this task, oldest first:"
FOOTER = "Try the task again. Avoid what failed before."


def outcome(trajectory: Trajectory) -> str:
    """The outcome of a trial in words, as memory shows it."""
    if trajectory.success:
        return "solved"
    end = "ran out of turns" if trajectory.truncated else "not solved"
    return f"{end} (reward {trajectory.reward:.2f})"


def trial_lines(trajectory: Trajectory, number: int) -> list[str]:
    """One earlier trial as lines: a heading, each turn's action and what came back, the reflection."""
    lines = [f"Attempt {number}: {outcome(trajectory)}."]
    messages = trajectory.messages
    turn = 0
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        turn += 1
        lines.append(f"Turn {turn}: " + _shorten(message.content, ACTION_CHARS))
        reply = messages[i + 1] if i + 1 < len(messages) else None
        if reply is not None and reply.role == "user":
            lines.append("Result: " + _shorten(reply.content, RESULT_CHARS))
    if is_reflection(trajectory.reflection, trajectory.actions):
        lines.append("Reflection: " + trajectory.reflection.strip())
    return lines


def is_reflection(text: str, actions: Sequence[str]) -> bool:
    """Whether ``text``, written after a trial whose actions were ``actions``, reads as a reflection.

    A small policy asked to reflect often acts instead (with the 270M default, most of its
    "reflections" were an ``Action: Answer`` with an empty answer). Memory does not show those: text
    with a code block, or whose first line repeats an action's first line or starts with the
    same ``Word:`` as one (``Action:``, ``Act:``, ``Think:``), is an action, not a lesson.
    """
    text = text.strip()
    if not text or "```" in text:
        return False
    first = text.splitlines()[0].strip()
    for action in actions:
        head = action.strip().splitlines()[0].strip() if action.strip() else ""
        if head and (first == head or (_label(head) and _label(first) == _label(head))):
            return False
    return True


def _label(line: str) -> str:
    """The ``Word:`` a line starts with (``Action``, ``Think``), lower-cased; "" when none."""
    word, colon, _ = line.partition(":")
    return word.strip().lower() if colon and word.strip().isalpha() and len(word) <= 12 else ""


def render_trials(trials: Sequence[Trajectory], budget: int, count: Callable[[str], int]) -> str:
    """The earlier trials of a task as one text of at most ``budget`` tokens (``count`` measures).

    The newest trials are kept whole first; when a trial no longer fits, its oldest turns go
    first, each action with the reply it got (its heading stays, then its reflection's lines),
    and older trials are left out. ``""`` when there is nothing to show or nothing fits.
    """
    if not trials or budget <= 0:
        return ""
    frame = count(HEADER + "\n" + FOOTER + "\n\n")
    blocks: list[list[str]] = []
    used = frame
    for number, trial in reversed(list(enumerate(trials, start=1))):
        lines = trial_lines(trial, number)
        whole = len(lines)
        size = count("\n".join(lines) + "\n")
        while size + used > budget and len(lines) > 1:
            # the oldest line after the heading goes, and the reply that answered it
            drop = 2 if lines[1].startswith("Turn ") and len(lines) > 2 and lines[2].startswith("Result: ") else 1
            lines = [lines[0], *lines[1 + drop :]]
            size = count("\n".join(lines) + "\n")
        if size + used > budget:
            break
        blocks.insert(0, lines)
        used += size
        if len(lines) < whole:  # this trial was cut: the older ones would only show their ends
            break
    if not blocks:
        return ""
    return "\n".join([HEADER, *(line for block in blocks for line in block), FOOTER]) + "\n\n"


def distill(trajectory: Trajectory, stage: str) -> Experience:
    """A trial as an experience for long-term memory: its task, outcome, reflection and actions."""
    return Experience(
        task=trajectory.task,
        success=trajectory.success,
        reward=trajectory.reward,
        reflection=trajectory.reflection,
        actions=trajectory.actions,
        stage=stage,
        trial=trajectory.trial,
    )


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def first_action(trajectory: Trajectory) -> str:
    """A trial's first action, stripped ("" when it took none)."""
    return next((m.content.strip() for m in trajectory.messages if m.role == "assistant"), "")


def repeated_retries(trials: Sequence[Trajectory]) -> tuple[int, int, int]:
    """How often retries begin as the trial before them did: a small policy shown its failed trial tends
    to replay it. Counts retries (trial >= 1 whose previous trial is among ``trials``), those whose first
    action is, verbatim, their previous trial's first action, and how many of those solved their task."""
    first = {(t.task.key, t.trial): first_action(t) for t in trials}
    retries = [t for t in trials if t.trial >= 1 and (t.task.key, t.trial - 1) in first]
    same = [t for t in retries if first[t.task.key, t.trial] == first[t.task.key, t.trial - 1]]
    return len(retries), len(same), sum(t.success for t in same)
