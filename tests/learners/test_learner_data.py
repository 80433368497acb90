"""Pair building, ETO's cut, replay mixing and tokenized examples, against hand-worked cases."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from agentloop.learners.data import (
    assistant_turns,
    build_pairs,
    cut_trajectory,
    dpo_examples,
    fit_messages,
    mix_replay,
    mix_replay_per_env,
    sft_examples,
    trial_pairs,
)
from agentloop.types import Message, Task, Trajectory


def make_trajectory(
    task_id: str,
    turns: int,
    reward: float,
    success: bool,
    source: str = "explore",
    final_observation: bool = False,
) -> Trajectory:
    """A conversation of ``turns`` user/assistant exchanges, optionally ending on a user turn."""
    task = Task("db", task_id, "train", "SELECT", f"question {task_id}")
    messages = [Message("user", f"The name of this table is Results {task_id}")]
    for i in range(turns):
        messages.append(Message("assistant", f"Action: Operation\n```sql\nSELECT {i} FROM t;\n```"))
        if i < turns - 1 or final_observation:
            messages.append(Message("user", f"[('row {i}',)]"))
    return Trajectory(
        task=task,
        messages=tuple(messages),
        tokenizer="",
        reward=reward,
        success=success,
        terminated=True,
        truncated=False,
        num_turns=turns,
        invalid_actions=0,
        source=source,
        policy_version=-1 if source == "expert" else 1,
        iteration=1,
    )


def test_failed_exploration_is_rejected_and_cut_to_expert_turns_plus_five() -> None:
    expert = make_trajectory("a", turns=3, reward=1.0, success=True, source="expert")
    explored = make_trajectory("a", turns=12, reward=0.0, success=False)
    (pair,) = build_pairs([expert], [explored], iteration=2)
    assert pair.chosen is expert
    assert pair.iteration == 2 and pair.task == expert.task
    # 3 expert turns + 5 = 8 assistant turns: user, (assistant, user) x 7, assistant = 16 messages
    assert assistant_turns(pair.rejected) == 8
    assert len(pair.rejected.messages) == 16
    assert pair.rejected.messages[-1].role == "assistant"
    assert pair.rejected.messages == explored.messages[:16]
    assert (pair.rejected.num_turns, pair.rejected.truncated, pair.rejected.terminated) == (8, True, False)


def test_extra_turns_is_a_parameter() -> None:
    expert = make_trajectory("a", turns=2, reward=1.0, success=True, source="expert")
    explored = make_trajectory("a", turns=9, reward=0.0, success=False)
    (pair,) = build_pairs([expert], [explored], iteration=1, extra_turns=1)
    assert assistant_turns(pair.rejected) == 3


def test_short_failed_exploration_is_kept_whole() -> None:
    expert = make_trajectory("a", turns=3, reward=1.0, success=True, source="expert")
    explored = make_trajectory("a", turns=8, reward=0.0, success=False, final_observation=True)
    (pair,) = build_pairs([expert], [explored], iteration=1)
    assert pair.rejected is explored


def test_ties_are_dropped() -> None:
    experts = [
        make_trajectory("a", 2, 1.0, True, "expert"),
        make_trajectory("b", 2, 0.5, True, "expert"),
        make_trajectory("c", 2, 1.0, True, "expert"),
    ]
    explored = [
        make_trajectory("a", 4, 1.0, True),  # tie at 1.0
        make_trajectory("b", 4, 0.5, False),  # tie at 0.5
        make_trajectory("c", 9, 0.0, False),  # expert wins
    ]
    pairs = build_pairs(experts, explored, iteration=1)
    assert [p.task.task_id for p in pairs] == ["c"]


def test_exploration_that_beats_the_expert_is_chosen() -> None:
    # Graded reward (WebShop-like): the expert succeeded with 0.5, the agent scored 0.75.
    expert = make_trajectory("a", turns=2, reward=0.5, success=True, source="expert")
    explored = make_trajectory("a", turns=10, reward=0.75, success=True)
    (pair,) = build_pairs([expert], [explored], iteration=1)
    assert pair.chosen is explored
    assert pair.rejected is expert  # a successful rejected trajectory is never cut


def test_failed_expert_rejected_is_cut_by_its_own_turns() -> None:
    expert = make_trajectory("a", turns=7, reward=0.0, success=False, source="expert")
    explored = make_trajectory("a", turns=3, reward=1.0, success=True)
    (pair,) = build_pairs([expert], [explored], iteration=1)
    assert (pair.chosen, pair.rejected) == (explored, expert)  # 7 turns <= 7 + 5: unchanged


def test_unmatched_explorations_are_skipped_and_duplicate_experts_refused() -> None:
    expert = make_trajectory("a", 2, 1.0, True, "expert")
    assert build_pairs([expert], [make_trajectory("z", 3, 0.0, False)], iteration=1) == []
    with pytest.raises(ValueError, match="two expert"):
        build_pairs([expert, expert], [], iteration=1)


def test_cut_trajectory_keeps_whole_turns_and_ends_on_the_assistant() -> None:
    t = make_trajectory("a", turns=4, reward=0.0, success=False, final_observation=True)
    cut = cut_trajectory(t, 2)
    assert [m.role for m in cut.messages] == ["user", "assistant", "user", "assistant"]
    assert cut_trajectory(t, 4) is t
    with pytest.raises(ValueError):
        cut_trajectory(t, 0)


@pytest.mark.parametrize(
    ("fraction", "old_size", "expected"),
    [(0.0, 10, 0), (0.25, 10, 3), (0.1, 4, 0), (0.1, 5, 1), (0.1, 30, 3), (1.0, 6, 6)],
)
def test_mix_replay_adds_the_rounded_fraction_of_old_items(fraction: float, old_size: int, expected: int) -> None:
    new = ["n1", "n2"]
    old = [f"o{i}" for i in range(old_size)]
    mixed = mix_replay(new, old, fraction, random.Random(0))
    assert mixed[:2] == new
    assert len(mixed) == 2 + expected
    assert len(set(mixed[2:])) == expected and set(mixed[2:]) <= set(old)
    assert mixed == mix_replay(new, old, fraction, random.Random(0))


def test_mix_replay_refuses_a_negative_fraction() -> None:
    with pytest.raises(ValueError):
        mix_replay([], [1], -0.1, random.Random(0))


def test_mix_replay_per_env_replays_the_fraction_of_each_envs_earlier_items() -> None:
    old = [make_trajectory(f"d{i}", 1, 1.0, True) for i in range(30)]
    old += [replace(t, task=replace(t.task, env="os")) for t in old[:10]]
    new = [make_trajectory("n", 1, 1.0, True)]
    mixed = mix_replay_per_env(new, old, 0.1, random.Random(0))
    assert mixed[0] is new[0]
    assert [t.task.env for t in mixed[1:]] == ["db"] * 3 + ["os"]  # 10% of 30 and of 10, envs in order
    assert len(mix_replay_per_env(new, old[:20], 0.1, random.Random(0))) == 1 + 2


def trial(task_id: str, number: int, turns: int, reward: float) -> Trajectory:
    return replace(make_trajectory(task_id, turns, reward, reward == 1.0), trial=number)


def test_trial_pairs_put_a_tasks_best_trial_against_each_worse_one() -> None:
    a = [trial("a", 0, 10, 0.0), trial("a", 1, 2, 0.5), trial("a", 2, 3, 1.0)]
    b = [trial("b", 0, 2, 1.0)]  # solved at once: nothing to contrast
    c = [trial("c", 0, 1, 0.0), trial("c", 1, 1, 0.0)]  # never solved, equal rewards: no pair
    d = [trial("d", 0, 2, 0.5), trial("d", 1, 2, 0.5), trial("d", 2, 2, 0.0)]  # the earliest best is chosen
    pairs = trial_pairs(a + b + c + d, iteration=3)
    assert [(p.task.task_id, p.chosen.trial, p.rejected.trial) for p in pairs] == [
        ("a", 2, 0),
        ("a", 2, 1),
        ("d", 0, 2),
    ]
    assert all(p.iteration == 3 for p in pairs)
    # A failure is cut to the chosen trial's turns + 5 (3 + 5 = 8 of its 10), as ETO cuts.
    assert pairs[0].rejected.num_turns == 8 and pairs[0].rejected.truncated
    assert pairs[1].rejected == a[1]  # short enough: whole


@pytest.fixture(scope="module")
def chat(tiny_model_dir: Path):
    """The tiny model's tokenizer in Gemma's turn format."""
    from transformers import AutoTokenizer

    from agentloop.policy.chat import ChatTokenizer

    return ChatTokenizer(AutoTokenizer.from_pretrained(str(tiny_model_dir)))


def masked_runs(ids: list[int], mask: list[int], value: int = 1) -> list[list[int]]:
    """The maximal runs of ``ids`` where ``mask == value``."""
    runs: list[list[int]] = []
    previous = None
    for token, bit in zip(ids, mask, strict=True):
        if bit == value:
            if previous != value:
                runs.append([])
            runs[-1].append(token)
        previous = bit
    return runs


def test_sft_mask_covers_exactly_the_assistant_text_and_stop_token(chat) -> None:
    t = make_trajectory("a", turns=3, reward=1.0, success=True, source="expert", final_observation=True)
    (example,), _ = sft_examples([t], chat, max_length=4096)
    decoded = [chat.tokenizer.decode(run) for run in masked_runs(example["input_ids"], example["assistant_masks"])]
    assert decoded == [m.content + "<end_of_turn>" for m in t.messages if m.role == "assistant"]
    # the final observation is dropped: nothing after the last assistant token affects the loss
    assert example["input_ids"][-1] == chat.stop_id
    tokenized = chat.tokenize(t)
    assert example["input_ids"] == tokenized.token_ids[: len(example["input_ids"])]


def test_sft_examples_keep_the_policy_tokens_as_generated(chat) -> None:
    t = chat.tokenize(make_trajectory("a", turns=2, reward=1.0, success=True))
    # A rollout may generate a non-canonical tokenization: it must be trained on as is.
    odd = tuple(chat.tokenizer.convert_tokens_to_ids(list("Action"))) + (chat.stop_id,)
    messages = (*t.messages[:-1], Message("assistant", "Action", odd))
    t = replace(t, messages=messages)
    (example,), _ = sft_examples([t], chat, max_length=4096)
    assert example["input_ids"][-len(odd) :] == list(odd)


def test_over_long_conversations_are_cut_at_a_turn_boundary_or_dropped(chat) -> None:
    t = chat.tokenize(make_trajectory("a", turns=3, reward=1.0, success=True))
    lengths = [len(m.token_ids) for m in t.messages]
    budget = sum(lengths[:3]) + 1  # room for user, assistant, user and one token of the next turn
    assert [m.role for m in fit_messages(t.messages, budget)] == ["user", "assistant"]
    (example,), report = sft_examples([t], chat, max_length=budget)
    assert len(example["input_ids"]) == sum(lengths[:2])
    # lost: the second and third exchanges (user + assistant each); the trailing observation never trains
    assert (report.cut, report.cut_tokens, report.dropped) == (1, sum(lengths[2:6]), 0)
    assert report.metrics("sft", "examples") == {
        "sft/cut_examples": 1.0,
        "sft/cut_tokens": float(sum(lengths[2:6])),
        "sft/dropped_examples": 0.0,
        "sft/retokenized": 0.0,
    }
    examples, report = sft_examples([t, t], chat, max_length=lengths[0])
    assert examples == [] and (report.cut, report.dropped) == (0, 2)
    assert sft_examples([t], chat, max_length=4096)[1].cut == 0


def test_pairs_cut_to_fit_are_counted_with_the_tokens_both_sides_lost(chat) -> None:
    expert = chat.tokenize(make_trajectory("a", turns=3, reward=1.0, success=True, source="expert"))
    explored = chat.tokenize(make_trajectory("a", turns=3, reward=0.0, success=False))
    (pair,) = build_pairs([expert], [explored], iteration=1)
    sides = [[len(m.token_ids) for m in t.messages] for t in (pair.chosen, pair.rejected)]
    budget = min(sum(lengths[:4]) for lengths in sides)  # both keep two exchanges, lose the third
    (_,), report = dpo_examples([pair], chat, max_length=budget)
    assert (report.cut, report.cut_tokens) == (1, sum(sum(lengths[4:6]) for lengths in sides))
    assert report.metrics("dpo", "pairs")["dpo/cut_pairs"] == 1.0


def test_trajectories_of_another_tokenizer_are_retokenized_with_one_warning_and_counted(chat, caplog) -> None:
    t = chat.tokenize(make_trajectory("a", turns=2, reward=1.0, success=True))
    foreign = replace(t, tokenizer="gemma:0123456789ab")
    expert = make_trajectory("b", turns=2, reward=1.0, success=True, source="expert")  # never tokenized: no warning
    with caplog.at_level("WARNING", logger="agentloop.policy.chat"):
        examples, report = sft_examples([foreign, foreign, expert, t], chat, max_length=4096)
    assert report.retokenized == 2 and len(examples) == 4
    assert len([r for r in caplog.records if "re-tokenized" in r.getMessage()]) == 1
    assert examples[0]["input_ids"] == examples[3]["input_ids"]  # same text, same tokens here


def test_dpo_example_masks_environment_turns_inside_completions(chat) -> None:
    expert = make_trajectory("a", turns=3, reward=1.0, success=True, source="expert")
    explored = make_trajectory("a", turns=2, reward=0.0, success=False, final_observation=True)
    (pair,) = build_pairs([expert], [explored], iteration=1)
    (example,), _ = dpo_examples([pair], chat, max_length=4096)
    first = chat.tokenize(expert).messages[0]
    assert example["prompt_ids"] == list(first.token_ids)
    for side, t in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        ids, mask = example[f"{side}_ids"], example[f"{side}_mask"]
        assistant = [chat.tokenizer.decode(run) for run in masked_runs(ids, mask)]
        assert assistant == [m.content + "<end_of_turn>" for m in t.messages if m.role == "assistant"]
        environment = [chat.tokenizer.decode(run) for run in masked_runs(ids, mask, value=0)]
        assert all(f"row {i}" in text for i, text in enumerate(environment))
        assert ids[-1] == chat.stop_id
