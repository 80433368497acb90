"""STE's trials through a real rollout on the Database environment, and the training data they make.

A scripted policy stands in for a model: it answers wrong on a task's first trial, reflects when
asked, and gives the gold answer once its prompt shows an earlier attempt.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from transformers import AutoTokenizer

from agentloop.envs import load_tasks, make_env
from agentloop.envs.db import SQLEnvConfig
from agentloop.envs.db.experts import gold_actions
from agentloop.envs.experts import replay_actions
from agentloop.learners.data import dpo_examples, sft_examples, strip_memory, trial_pairs
from agentloop.memory import MemoryConfig, Trials
from agentloop.memory.reflection import reflection_prompt
from agentloop.policy.base import Generation, SamplingConfig
from agentloop.policy.chat import ChatTokenizer
from agentloop.rollout import Rollout, RolloutConfig

WRONG = 'Action: Answer\nFinal Answer: ["surely not this"]'
REFLECTION = "I answered without looking at the table; query it first."


class LearnsFromMemory:
    """Wrong until its prompt shows an earlier attempt; then the gold actions. Reflects when asked.
    Records how it was asked to sample each turn and reflection."""

    def __init__(self, chat: ChatTokenizer, gold: dict[str, list[str]]) -> None:
        self.chat, self.gold, self.version = chat, gold, 3
        self.asked: list[tuple[str, float, int]] = []  # (what was generated, temperature, max_new_tokens)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        out = []
        for prompt in prompts:
            text = self.chat.tokenizer.decode(prompt)
            if "The attempt is over" in text.rsplit("<start_of_turn>user", 1)[-1]:
                action = REFLECTION
            else:
                actions = next(a for question, a in self.gold.items() if question in text)
                turn = (sum(t == self.chat.stop_id for t in prompt) - 1) // 2
                script = actions if "Attempt 1:" in text else [WRONG]
                action = script[turn] if turn < len(script) else "no idea"
            self.asked.append((action, sampling.temperature, sampling.max_new_tokens))
            out.append(Generation(tuple(self.chat.assistant_segment(action)), action, True))
        return out


@pytest.fixture(scope="module")
def played(data_dir, tiny_model_dir):
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    every = load_tasks("db", data_dir, "dev")[:40]
    config = SQLEnvConfig()
    env = make_env("db", every, config)
    gold = {t.task.instruction: gold_actions(t, config) for t in every}
    tasks = [
        t
        for t in every
        if gold[t.task.instruction] and replay_actions(env, t.task.task_id, gold[t.task.instruction]).success
    ][:4]
    policy = LearnsFromMemory(chat, {t.task.instruction: gold[t.task.instruction] for t in tasks})
    feed = Trials([t.task for t in tasks], MemoryConfig(trials=3, long_term_tokens=0), chat.count)
    run = Rollout(
        policy,
        lambda name: make_env(name, every, config),
        feed,
        RolloutConfig(concurrent_episodes=3, max_context_tokens=4096, env_threads=2),
        source="explore",
        iteration=1,
        reflect=reflection_prompt,
        reflection_tokens=MemoryConfig().reflection_tokens,
    )
    trajectories = [t for _, t in run]
    return chat, tasks, trajectories, run.stats, policy.asked


def test_each_task_gets_a_second_trial_shown_the_first_and_stops_at_its_success(played):
    chat, tasks, trajectories, stats, asked = played
    assert len(trajectories) == 8 and stats.episodes == 8
    by_task = {
        t.task.task_id: sorted((x for x in trajectories if x.task == t.task), key=lambda x: x.trial) for t in tasks
    }
    for first, second in by_task.values():
        assert (first.trial, first.success, first.memory) == (0, False, "")
        assert (second.trial, second.success) == (1, True)
        assert first.reflection == REFLECTION == second.reflection  # one more turn, not in the messages
        assert all(REFLECTION not in m.content for m in first.messages)
        # The second trial saw the first: outcome, action, reflection; then the task itself.
        assert (
            second.memory.startswith("Your earlier attempts at this task") and "Attempt 1: not solved" in second.memory
        )
        assert "surely not this" in second.memory and REFLECTION in second.memory
        assert second.messages[0].content == second.memory + first.messages[0].content
        assert second.messages[0].token_ids == tuple(chat.user_segment(second.messages[0].content, first=True))
    # Memory's prompt tokens are counted exactly: the first turns' extra tokens, and in every turn's prompt
    # (and the reflection's) of the trial, as prompt_tokens counts prompts.
    extra = [
        len(t.messages[0].token_ids) - len(chat.user_segment(t.messages[0].content[len(t.memory) :], first=True))
        for t in trajectories
    ]
    assert stats.memory_tokens == sum(extra) > 0
    turns = [t.num_turns + 1 for t in trajectories]  # + its reflection
    assert stats.memory_prompt_tokens == sum(e * n for e, n in zip(extra, turns, strict=True)) > stats.memory_tokens
    reflected = sum(len(chat.assistant_segment(REFLECTION)) for _ in trajectories)
    assert stats.reflection_tokens == reflected
    # First trials decode greedily, retries at memory.retry_temperature; reflections within their own budget.
    config = MemoryConfig()
    assert {(t, n) for a, t, n in asked if a == REFLECTION} == {(0.0, config.reflection_tokens)}
    turns = {(t, n) for a, t, n in asked if a != REFLECTION}
    budget = SamplingConfig().max_new_tokens
    assert turns == {(0.0, budget), (config.retry_temperature, budget)}
    assert sum(a == WRONG for a, _, _ in asked) == 4 and all(t == 0.0 for a, t, _ in asked if a == WRONG)
    assert stats.generated_tokens == sum(t.generated_tokens for t in trajectories)
    assert all(
        t.generated_tokens == reflected // 8 + sum(len(m.token_ids) for m in t.messages if m.role == "assistant")
        for t in trajectories
    )


def test_stripped_memory_leaves_the_prompt_a_rollout_without_memory_sees_and_the_policys_own_tokens(played):
    chat, _, trajectories, _, _ = played
    for later in (t for t in trajectories if t.trial):
        first = next(t for t in trajectories if t.task == later.task and t.trial == 0)
        bare = strip_memory(later, chat)
        assert bare.memory == "" and bare.messages[0] == first.messages[0]  # what a rollout without memory saw
        assert bare.messages[1:] == later.messages[1:]  # every other token as played
        [example], _ = sft_examples([later], chat, max_length=4096)
        assert example["input_ids"] == bare.token_ids
        trained = [t for t, m in zip(example["input_ids"], example["assistant_masks"], strict=True) if m]
        assert trained == [t for m in later.messages if m.role == "assistant" for t in m.token_ids]
        [kept], _ = sft_examples([later], chat, max_length=4096, keep_memory=True)
        assert kept["input_ids"] == later.token_ids


def test_trials_of_a_task_pair_its_success_against_its_failure_on_the_tasks_own_prompt(played):
    chat, tasks, trajectories, _, _ = played
    pairs = trial_pairs(trajectories, iteration=1)
    assert len(pairs) == len(tasks)
    for pair in pairs:
        assert (pair.chosen.trial, pair.chosen.success, pair.rejected.trial) == (1, True, 0)
    examples, report = dpo_examples(pairs, chat, max_length=4096)
    assert report.examples == len(tasks)
    for pair, example in zip(pairs, examples, strict=True):
        prompt = pair.rejected.messages[0].token_ids  # the first trial had no memory
        assert example["prompt_ids"] == list(prompt[: len(example["prompt_ids"])])
        assert len(example["prompt_ids"]) >= len(prompt) - 2  # the shared prefix is the whole task prompt


class RepeatsItself:
    """Shown its failed attempt, begins the retry as that attempt did for its first ``stubborn`` draws of the
    retry's first turn, then plays the gold actions; a first trial answers wrong."""

    def __init__(self, chat: ChatTokenizer, gold: dict[str, list[str]], stubborn: int) -> None:
        self.chat, self.gold, self.stubborn, self.version = chat, gold, stubborn, 3
        self.draws: dict[str, int] = {}  # retries' first-turn draws per task

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        out = []
        for prompt in prompts:
            text = self.chat.tokenizer.decode(prompt)
            question, actions = next((q, a) for q, a in self.gold.items() if q in text)
            turn = (sum(t == self.chat.stop_id for t in prompt) - 1) // 2
            action = WRONG
            if "Attempt 1:" in text:
                if turn == 0:
                    self.draws[question] = self.draws.get(question, 0) + 1
                repeating = turn == 0 and self.draws[question] <= self.stubborn
                action = WRONG if repeating else actions[turn] if turn < len(actions) else "no idea"
            out.append(Generation(tuple(self.chat.assistant_segment(action)), action, True))
        return out


@pytest.mark.parametrize("redraws", [0, 1, 2])
def test_a_retry_repeating_its_failed_first_action_is_drawn_again_up_to_memory_redraws(
    data_dir, tiny_model_dir, redraws
):
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    every = load_tasks("db", data_dir, "dev")[:40]
    config = SQLEnvConfig()
    env = make_env("db", every, config)
    gold = {t.task.instruction: gold_actions(t, config) for t in every}
    tasks = [t for t in every if gold[t.task.instruction]]
    tasks = [t for t in tasks if replay_actions(env, t.task.task_id, gold[t.task.instruction]).success][:3]
    policy = RepeatsItself(chat, {t.task.instruction: gold[t.task.instruction] for t in tasks}, stubborn=2)
    memory = MemoryConfig(trials=2, long_term_tokens=0, reflect=False, redraws=redraws)
    run = Rollout(
        policy,
        lambda name: make_env(name, every, config),
        Trials([t.task for t in tasks], memory, chat.count),
        RolloutConfig(concurrent_episodes=3, max_context_tokens=4096, env_threads=0),
        source="explore",
        iteration=1,
    )
    retries = [t for _, t in run if t.trial == 1]
    assert len(retries) == 3
    # Two stubborn draws: one redraw leaves the retry beginning as its failed trial did; two find the gold action.
    assert all(t.success == (redraws >= 2) for t in retries)
    assert run.stats.redraws == 3 * redraws
    assert run.stats.redrawn_tokens == 3 * redraws * len(chat.assistant_segment(WRONG))
    for t in retries:  # only the draw played is kept: its tokens, once
        assert [m.content for m in t.messages if m.role == "assistant"][0] == (
            WRONG if redraws < 2 else gold[t.task.instruction][0]
        )
        assert t.generated_tokens == sum(len(m.token_ids) for m in t.messages if m.role == "assistant")


def test_redraws_need_retries_that_sample():
    from agentloop.config import ConfigError

    MemoryConfig(redraws=2).validate()
    with pytest.raises(ConfigError, match="redraws"):
        MemoryConfig(redraws=2, retry_temperature=0).validate()
    with pytest.raises(ConfigError, match="redraws"):
        MemoryConfig(redraws=-1).validate()
