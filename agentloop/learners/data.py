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
from dataclasses import replace
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


def sft_examples(trajectories: Sequence[Trajectory], chat: ChatTokenizer, max_length: int) -> list[SFTExample]:
    """Tokenized SFT examples, one per trajectory, with the assistant-only loss mask.

    Over-long conversations are truncated at a turn boundary (the longest prefix of whole
    turns that fits, see :func:`fit_messages`); those with no assistant turn left are
    dropped. Both counts are logged.
    """
    examples, truncated, dropped = [], 0, 0
    for trajectory in trajectories:
        messages = chat.tokenize(trajectory).messages
        kept = fit_messages(messages, max_length)
        if not kept:
            dropped += 1
            continue
        truncated += len(kept) < len(fit_messages(messages, sys.maxsize))
        input_ids, mask = _tokens(kept)
        examples.append({"input_ids": input_ids, "assistant_masks": mask})
    logger.info(
        "SFT data: %d examples, %d truncated at a turn boundary, %d dropped (no assistant turn within %d tokens)",
        len(examples),
        truncated,
        dropped,
        max_length,
    )
    return examples


def dpo_examples(pairs: Sequence[Pair], chat: ChatTokenizer, max_length: int) -> list[DPOExample]:
    """Tokenized DPO examples: a shared prompt, then each side's remaining turns and assistant mask.

    The prompt is the tokens both sides share within the first message (in ETO the task
    instruction, identical on both sides); ``chosen_ids`` / ``rejected_ids`` are the rest of
    each conversation, and their masks are 1 only on assistant tokens, so environment turns
    inside a completion do not count in the log-probabilities. Each side is truncated at a
    turn boundary to ``max_length`` tokens (prompt included); a pair whose side keeps no
    assistant turn is dropped. Counts are logged.
    """
    examples, truncated, dropped = [], 0, 0
    for pair in pairs:
        sides = [chat.tokenize(t).messages for t in (pair.chosen, pair.rejected)]
        kept = [fit_messages(messages, max_length) for messages in sides]
        if not all(kept):
            dropped += 1
            continue
        truncated += any(len(k) < len(fit_messages(m, sys.maxsize)) for k, m in zip(kept, sides, strict=True))
        examples.append(_preference_example(*kept))
    logger.info(
        "DPO data: %d pairs, %d with a side cut at a turn boundary, %d dropped (no assistant turn within %d tokens)",
        len(examples),
        truncated,
        dropped,
        max_length,
    )
    return examples


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
