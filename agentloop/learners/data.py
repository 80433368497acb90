"""Training data for the learners: ETO preference pairs, experience replay, tokenized examples.

Everything here works on :mod:`agentloop.types` records and plain lists; nothing imports
torch, so the pair and replay rules are cheap to test against hand-worked numbers.

Tokens in, tokens out: a training example is the concatenation of its messages'
``token_ids`` (see :class:`agentloop.policy.chat.ChatTokenizer`), and its loss mask is 1
exactly on the assistant messages' tokens. Trajectories that arrive without tokens (expert
demonstrations) are tokenized turn by turn first.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from agentloop.policy.chat import ChatTokenizer
from agentloop.types import Message, Pair, Trajectory

logger = logging.getLogger(__name__)

T = TypeVar("T")

SFTExample = dict[str, list[int]]
"""``input_ids`` and ``assistant_masks`` (the column TRL's SFTTrainer folds into its labels)."""

DPOExample = dict[str, list[int]]
"""``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and the assistant masks ``chosen_mask``, ``rejected_mask``."""


def assistant_turns(trajectory: Trajectory) -> int:
    """Number of assistant messages in the conversation."""
    return sum(m.role == "assistant" for m in trajectory.messages)


def cut_trajectory(trajectory: Trajectory, max_turns: int) -> Trajectory:
    """The trajectory cut to its first ``max_turns`` assistant turns, as ETO cuts failed explorations.

    Whole turns are kept: the conversation runs up to and including the ``max_turns``-th
    assistant message, so it ends with an assistant message. A trajectory with at most
    ``max_turns`` assistant turns is returned unchanged. A cut trajectory gets ``num_turns``
    = ``max_turns``, ``truncated=True`` and ``terminated=False`` (a turn budget ended it);
    ``invalid_actions`` and ``generated_tokens`` still describe the whole episode.

    Raises:
        ValueError: If ``max_turns`` is below 1.
    """
    if max_turns < 1:
        raise ValueError(f"max_turns must be at least 1, got {max_turns}")
    if assistant_turns(trajectory) <= max_turns:
        return trajectory
    ends = [i for i, message in enumerate(trajectory.messages) if message.role == "assistant"]
    messages = trajectory.messages[: ends[max_turns - 1] + 1]
    return replace(trajectory, messages=messages, num_turns=max_turns, truncated=True, terminated=False)


def build_pairs(
    experts: Sequence[Trajectory],
    explored: Sequence[Trajectory],
    iteration: int,
    extra_turns: int = 5,
) -> list[Pair]:
    """ETO's trajectory-level preference pairs: per task, expert against exploration.

    Each explored trajectory is paired with the expert trajectory of its task (tasks are
    matched on ``(env, task_id)``). The one with the higher final reward is chosen, the
    other rejected; equal rewards give no pair. A rejected trajectory that did not succeed
    is cut to the expert's number of assistant turns plus ``extra_turns`` (ETO: + 5).
    Explored trajectories whose task has no expert are skipped.

    Args:
        experts: At most one demonstration per task.
        explored: The policy's trajectories on training tasks.
        iteration: Loop iteration recorded in each pair.
        extra_turns: Turns a failed rejected trajectory may run beyond the expert's.

    Raises:
        ValueError: If two experts share a task.
    """
    by_task: dict[tuple[str, str], Trajectory] = {}
    for expert in experts:
        key = (expert.task.env, expert.task.task_id)
        if key in by_task:
            raise ValueError(f"two expert trajectories for task {key}")
        by_task[key] = expert
    pairs, ties, unmatched = [], 0, 0
    for trajectory in explored:
        expert = by_task.get((trajectory.task.env, trajectory.task.task_id))
        if expert is None:
            unmatched += 1
            continue
        if trajectory.reward == expert.reward:
            ties += 1
            continue
        chosen, rejected = (trajectory, expert) if trajectory.reward > expert.reward else (expert, trajectory)
        if not rejected.success:
            rejected = cut_trajectory(rejected, assistant_turns(expert) + extra_turns)
        pairs.append(Pair(task=expert.task, chosen=chosen, rejected=rejected, iteration=iteration))
    logger.info("built %d pairs (%d ties dropped, %d without an expert)", len(pairs), ties, unmatched)
    return pairs


def strip_memory(trajectory: Trajectory, chat: ChatTokenizer) -> Trajectory:
    """The trajectory as the policy would have seen it without memory (STE trains on query to solution).

    The first message becomes the task's own observation, tokenized as a rollout without
    memory tokenizes it; every other message keeps its tokens, so the learner still trains on
    exactly what the policy produced. A trajectory without memory is returned unchanged.

    Raises:
        ValueError: If the first message does not start with the trajectory's memory.
    """
    if not trajectory.memory:
        return trajectory
    first, *rest = chat.tokenize(trajectory).messages
    if not first.content.startswith(trajectory.memory):
        raise ValueError(f"{trajectory.task.task_id}: the first message does not start with the episode's memory")
    content = first.content[len(trajectory.memory) :]
    bare = Message("user", content, tuple(chat.user_segment(content, first=True)))
    return replace(trajectory, messages=(bare, *rest), memory="", tokenizer=chat.name)


def trial_pairs(trials: Sequence[Trajectory], iteration: int, extra_turns: int = 5) -> list[Pair]:
    """Preference pairs among the trials of each task (STE's exploration): success against failure.

    Per task, the best trial (highest reward; the earliest among equals) is chosen against
    every trial of lower reward, which is cut to the chosen one's turns plus ``extra_turns``
    when it did not succeed (as :func:`build_pairs` cuts). Tasks whose trials all got the
    same reward give no pair.
    """
    by_task: dict[tuple[str, str], list[Trajectory]] = {}
    for t in trials:
        by_task.setdefault((t.task.env, t.task.task_id), []).append(t)
    pairs = []
    for found in by_task.values():
        best = max(sorted(found, key=lambda t: t.trial), key=lambda t: t.reward)
        for other in sorted(found, key=lambda t: t.trial):
            if other.reward >= best.reward:
                continue
            rejected = other if other.success else cut_trajectory(other, assistant_turns(best) + extra_turns)
            pairs.append(Pair(task=best.task, chosen=best, rejected=rejected, iteration=iteration))
    logger.info("built %d pairs from the trials of %d tasks", len(pairs), len(by_task))
    return pairs


def mix_replay(new: Sequence[T], old: Sequence[T], fraction: float, rng: random.Random) -> list[T]:
    """This round's training items plus a sample of earlier rounds' items (STE-style replay).

    Exactly ``k = min(len(old), floor(fraction * len(old) + 0.5))`` items are drawn from
    ``old`` uniformly without replacement and appended after all of ``new``; ``old`` is the
    pool of every earlier round's items, so each earlier round contributes ``fraction`` of
    its items in expectation (STE uses 0.1). ``fraction = 0`` returns ``new`` unchanged.

    Raises:
        ValueError: If ``fraction`` is negative.
    """
    if fraction < 0:
        raise ValueError(f"replay fraction must be non-negative, got {fraction}")
    k = min(len(old), math.floor(fraction * len(old) + 0.5))
    return list(new) + rng.sample(list(old), k)


def mix_replay_per_env(new: Sequence[T], old: Sequence[T], fraction: float, rng: random.Random) -> list[T]:
    """:func:`mix_replay` within each environment: ``fraction`` of every env's earlier items
    (by ``item.task.env``; trajectories and pairs both have it), so an env trained in earlier
    rounds keeps its share however much data a newer env brings. Envs in sorted order."""
    by_env: dict[str, list[T]] = {}
    for item in old:
        by_env.setdefault(item.task.env, []).append(item)  # type: ignore[attr-defined]
    mixed = list(new)
    for env in sorted(by_env):
        mixed += mix_replay([], by_env[env], fraction, rng)
    return mixed


def fit_messages(messages: Sequence[Message], max_length: int) -> tuple[Message, ...]:
    """The longest whole-message prefix within ``max_length`` tokens that ends on an assistant turn.

    Trailing environment turns are dropped: with causal attention nothing after the last
    assistant token changes the loss. Returns ``()`` when no assistant turn fits.
    """
    kept, total = [], 0
    for message in messages:
        total += len(message.token_ids)
        if total > max_length:
            break
        kept.append(message)
    while kept and kept[-1].role != "assistant":
        kept.pop()
    return tuple(kept)


def _tokens(messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    ids = [t for m in messages for t in m.token_ids]
    mask = [int(m.role == "assistant") for m in messages for _ in m.token_ids]
    return ids, mask


@dataclass(frozen=True)
class DataReport:
    """What turning records into training examples cut, dropped or re-tokenized."""

    examples: int
    """Examples (SFT conversations, DPO pairs) kept."""
    cut: int
    """Kept examples cut at a turn boundary to fit ``max_length`` (a pair counts once)."""
    cut_tokens: int
    """Tokens those cuts removed (both sides of a pair), trailing environment turns included."""
    dropped: int
    """Examples left out: no assistant turn within ``max_length``."""
    retokenized: int
    """Trajectories generated under another tokenizer, re-tokenized from their text."""

    def metrics(self, prefix: str, unit: str) -> dict[str, float]:
        """``<prefix>/cut_<unit>``, ``<prefix>/cut_tokens``, ``<prefix>/dropped_<unit>``, ``<prefix>/retokenized``."""
        return {
            f"{prefix}/cut_{unit}": float(self.cut),
            f"{prefix}/cut_tokens": float(self.cut_tokens),
            f"{prefix}/dropped_{unit}": float(self.dropped),
            f"{prefix}/retokenized": float(self.retokenized),
        }


def sft_examples(
    trajectories: Sequence[Trajectory], chat: ChatTokenizer, max_length: int, keep_memory: bool = False
) -> tuple[list[SFTExample], DataReport]:
    """Tokenized SFT examples, one per trajectory, with the assistant-only loss mask.

    Memory an episode was shown is stripped first (:func:`strip_memory`) unless ``keep_memory``.

    Over-long conversations are cut at a turn boundary (the longest prefix of whole turns
    that fits, see :func:`fit_messages`); those with no assistant turn left are dropped. The
    report counts both, and the tokens the cuts lost; a cut is logged as a warning.
    """
    _check_max_length(max_length)
    examples, cut, lost, dropped = [], 0, 0, 0
    retokenized = chat.retokenized
    for trajectory in trajectories:
        trajectory = trajectory if keep_memory else strip_memory(trajectory, chat)
        messages = chat.tokenize(trajectory).messages
        kept = fit_messages(messages, max_length)
        if not kept:
            dropped += 1
            continue
        missing = _lost_tokens(messages, kept)
        cut, lost = cut + (missing > 0), lost + missing
        input_ids, mask = _tokens(kept)
        examples.append({"input_ids": input_ids, "assistant_masks": mask})
    report = DataReport(len(examples), cut, lost, dropped, chat.retokenized - retokenized)
    _log(report, "SFT", "conversations", max_length)
    return examples, report


def dpo_examples(
    pairs: Sequence[Pair], chat: ChatTokenizer, max_length: int, keep_memory: bool = False
) -> tuple[list[DPOExample], DataReport]:
    """Tokenized DPO examples: a shared prompt, then each side's remaining turns and assistant mask.

    Memory either side was shown is stripped first (:func:`strip_memory`) unless ``keep_memory``,
    so trials of one task share the task's prompt.

    The prompt is the tokens both sides share within the first message (in ETO the task
    instruction, identical on both sides); ``chosen_ids`` / ``rejected_ids`` are the rest of
    each conversation, and their masks are 1 only on assistant tokens, so environment turns
    inside a completion do not count in the log-probabilities. Each side is cut at a turn
    boundary to ``max_length`` tokens (prompt included); a pair whose side keeps no
    assistant turn is dropped. The report counts both, and the tokens the cuts lost.
    """
    _check_max_length(max_length)
    examples, cut, lost, dropped = [], 0, 0, 0
    retokenized = chat.retokenized
    for pair in pairs:
        sides = [
            chat.tokenize(t if keep_memory else strip_memory(t, chat)).messages for t in (pair.chosen, pair.rejected)
        ]
        kept = [fit_messages(messages, max_length) for messages in sides]
        if not all(kept):
            dropped += 1
            continue
        missing = sum(_lost_tokens(m, k) for m, k in zip(sides, kept, strict=True))
        cut, lost = cut + (missing > 0), lost + missing
        examples.append(_preference_example(*kept))
    report = DataReport(len(examples), cut, lost, dropped, chat.retokenized - retokenized)
    _log(report, "DPO", "pairs", max_length)
    return examples, report


def _check_max_length(max_length: int) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be set (0 means an experiment fits it to its envs first), got {max_length}")


def _lost_tokens(messages: Sequence[Message], kept: Sequence[Message]) -> int:
    """Tokens of ``messages`` beyond the kept prefix that could have trained (trailing env turns don't count)."""
    whole = fit_messages(messages, sys.maxsize)
    return sum(len(m.token_ids) for m in whole[len(kept) :])


def _log(report: DataReport, name: str, unit: str, max_length: int) -> None:
    logger.info("%s data: %d %s, %d dropped", name, report.examples, unit, report.dropped)
    if report.cut or report.dropped:
        logger.warning(
            "%s data: %d of %d %s cut at a turn boundary (%d tokens lost) and %d dropped to fit max_length=%d",
            name,
            report.cut,
            report.examples,
            unit,
            report.cut_tokens,
            report.dropped,
            max_length,
        )


def _preference_example(chosen: Sequence[Message], rejected: Sequence[Message]) -> DPOExample:
    """Splits two tokenized conversations into the shared prompt and the two masked completions."""
    (chosen_ids, chosen_mask), (rejected_ids, rejected_mask) = _tokens(chosen), _tokens(rejected)
    limit = min(len(chosen[0].token_ids), len(rejected[0].token_ids))
    n = 0
    while n < limit and chosen_ids[n] == rejected_ids[n]:
        n += 1
    return {
        "prompt_ids": chosen_ids[:n],
        "chosen_ids": chosen_ids[n:],
        "rejected_ids": rejected_ids[n:],
        "chosen_mask": chosen_mask[n:],
        "rejected_mask": rejected_mask[n:],
    }
