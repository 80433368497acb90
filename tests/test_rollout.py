"""Rollout on the real Database environment, with a scripted policy standing in for a model."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from transformers import AutoTokenizer

from agentloop.envs import load_tasks, make_env
from agentloop.envs.db import SQLEnvConfig
from agentloop.envs.db.experts import gold_actions
from agentloop.envs.experts import replay_actions
from agentloop.policy.base import Generation, SamplingConfig
from agentloop.policy.chat import ChatTokenizer
from agentloop.rollout import Rollout, RolloutConfig, rollout


class ScriptedPolicy:
    """Answers each task with a fixed list of actions, chosen by the question in the prompt."""

    def __init__(self, chat: ChatTokenizer, scripts: dict[str, list[str]]) -> None:
        self.chat, self.scripts, self.version, self.calls = chat, scripts, 7, []

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        self.calls.append(len(prompts))
        out = []
        for prompt in prompts:
            text = self.chat.tokenizer.decode(prompt)
            script = next(actions for question, actions in self.scripts.items() if question in text)
            turn = (sum(t == self.chat.stop_id for t in prompt) - 1) // 2  # each user turn has one too
            action = script[turn] if turn < len(script) else "no idea"
            out.append(Generation(tuple(self.chat.assistant_segment(action)), action, True))
        return out


@pytest.fixture(scope="module")
def setup(data_dir, tiny_model_dir):
    chat = ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))
    tasks = load_tasks("db", data_dir, "dev")[:40]
    return chat, tasks


def test_rollout_replays_experts_and_keeps_tokens(setup):
    chat, all_tasks = setup
    config = SQLEnvConfig()
    scripted = {t.task.instruction: gold_actions(t, config) for t in all_tasks}
    env = make_env("db", all_tasks, config)
    solved = [
        t
        for t in all_tasks
        if scripted[t.task.instruction] and replay_actions(env, t.task.task_id, scripted[t.task.instruction]).success
    ]
    tasks = solved[:5]
    wrong = tasks[-1]
    scripted[wrong.task.instruction] = ['Action: Answer\nFinal Answer: ["surely not this"]']
    policy = ScriptedPolicy(chat, {t.task.instruction: scripted[t.task.instruction] for t in tasks})

    trajectories, stats = rollout(
        policy,
        lambda env: make_env(env, all_tasks, config),
        [t.task for t in tasks],
        RolloutConfig(concurrent_episodes=2, env_threads=0),  # steps between generation calls: a fixed order
        source="eval",
        iteration=3,
    )
    assert [t.task for t in trajectories] == [t.task for t in tasks]
    assert max(policy.calls) == 2  # two episodes advance together
    assert [t.success for t in trajectories] == [True] * 4 + [False]
    assert trajectories[-1].reward == 0.0 and trajectories[-1].terminated
    for t in trajectories:
        assert (t.source, t.iteration, t.policy_version, t.tokenizer) == ("eval", 3, 7, chat.name)
        assert chat.tokenize(t) == t  # every message already carries its tokens
        assert t.messages[0].token_ids[0] == chat.tokenizer.bos_token_id
        assert t.num_turns == sum(m.role == "assistant" for m in t.messages)
        assert t.generated_tokens == sum(len(m.token_ids) for m in t.messages if m.role == "assistant")
    assert stats.episodes == 5 and stats.generated_tokens == sum(t.generated_tokens for t in trajectories)
    prompts = sum(len(t.token_ids) - len(t.messages[-1].token_ids) for t in trajectories if t.num_turns == 1)
    assert stats.prompt_tokens >= prompts > 0 and stats.prefix_reuse == 0.0  # a scripted policy caches nothing


def test_tasks_of_several_envs_share_one_rollout(setup, data_dir):
    from agentloop.envs.webshop import WebShopEnvConfig
    from agentloop.envs.webshop.experts import expert_actions

    chat, db_tasks = setup
    shop = WebShopEnvConfig()
    shop_tasks = [t for t in load_tasks("webshop", data_dir, "test")[:10] if expert_actions(t, shop)][:3]
    db_config = SQLEnvConfig()
    scripts = {t.task.instruction: gold_actions(t, db_config) for t in db_tasks[:3]}
    scripts |= {t.task.instruction: expert_actions(t, shop) for t in shop_tasks}
    configs, built = {"db": db_config, "webshop": shop}, []

    def make(env: str):
        built.append(env)
        return make_env(env, db_tasks if env == "db" else shop_tasks, configs[env])

    mixed = [t.task for pair in zip(db_tasks[:3], shop_tasks, strict=True) for t in pair]
    trajectories, _ = rollout(
        ScriptedPolicy(chat, scripts),
        make,
        mixed,
        RolloutConfig(concurrent_episodes=2, max_context_tokens=8192),  # item pages with many options are long
        source="eval",
        iteration=0,
    )
    assert [t.task for t in trajectories] == mixed
    assert all(t.success for t in trajectories if t.task.env == "webshop")
    assert {"db", "webshop"} == set(built) and max(built.count("db"), built.count("webshop")) <= 2  # reused


def test_turn_limit_and_context_budget_truncate(setup):
    chat, tasks = setup
    task = tasks[0]
    loop = ["Action: Operation\n```sql\nSELECT 1;\n```"] * 20
    policy = ScriptedPolicy(chat, {task.task.instruction: loop})
    config = SQLEnvConfig(max_turns=3)
    (t,), _ = rollout(
        policy, lambda env: make_env(env, tasks, config), [task.task], RolloutConfig(), source="explore", iteration=1
    )
    assert t.truncated and not t.terminated and t.num_turns == 3 and t.reward == 0.0

    first = len(chat.user_segment(initial := t.messages[0].content, first=True))
    assert initial
    budget = RolloutConfig(max_context_tokens=first + 200, sampling=SamplingConfig(max_new_tokens=150))
    (t,), _ = rollout(
        policy,
        lambda env: make_env(env, tasks, SQLEnvConfig(max_turns=10)),
        [task.task],
        budget,
        source="explore",
        iteration=1,
    )
    assert t.truncated and not t.terminated and t.num_turns < 10
    assert len(t.token_ids) + 150 > first + 200


def test_malformed_actions_are_counted(setup):
    chat, tasks = setup
    task = tasks[0]
    policy = ScriptedPolicy(chat, {task.task.instruction: ["hello", "\x00\x01", "Action: Answer\nFinal Answer: []"]})
    (t,), _ = rollout(
        policy, lambda e: make_env(e, tasks, SQLEnvConfig()), [task.task], RolloutConfig(), source="eval", iteration=0
    )
    assert t.invalid_actions == 2 and t.terminated and t.num_turns == 3


class _NoStream:
    """Hides a policy's own stream, so the rollout falls back to one generation call per turn."""

    def __init__(self, policy) -> None:
        self.chat, self.version, self.generate = policy.chat, policy.version, policy.generate


def test_continuous_batching_plays_the_same_episodes_as_lockstep_turns(setup, tiny_model_dir):
    from agentloop.policy.base import PolicyConfig
    from agentloop.policy.hf import HFPolicy

    chat, tasks = setup
    config = RolloutConfig(concurrent_episodes=5, sampling=SamplingConfig(max_new_tokens=24))
    runs, policies = {}, {}
    for name in ("continuous", "lockstep"):
        policy = policies[name] = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=3))
        acting = policy if name == "continuous" else _NoStream(policy)
        runs[name] = rollout(
            acting,
            lambda env: make_env(env, tasks, SQLEnvConfig(max_turns=3)),
            [t.task for t in tasks[:7]],
            config,
            source="eval",
            iteration=0,
        )
    (ours, stats), (reference, reference_stats) = runs["continuous"], runs["lockstep"]
    assert [[(m.role, m.content, m.token_ids) for m in t.messages] for t in ours] == [
        [(m.role, m.content, m.token_ids) for m in t.messages] for t in reference
    ]
    for a, b in zip(ours, reference, strict=True):  # log-probs equal up to batching's float rounding
        for x, y in zip(a.messages, b.messages, strict=True):
            assert len(x.logprobs) == (len(x.token_ids) if x.role == "assistant" else 0)
            assert all(abs(p - q) < 1e-4 for p, q in zip(x.logprobs, y.logprobs, strict=True))
    assert sum(t.num_turns for t in ours) > len(ours)  # multi-turn episodes
    assert stats.prompt_tokens == reference_stats.prompt_tokens
    assert stats.prefix_reuse > 0.5  # later turns prefilled only their new tokens
    assert len(policies["continuous"].prefix_cache) == 0  # ended episodes leave nothing behind


class _SlowStep:
    """The DB env, but one task's steps take ``delay`` seconds (a slow command in a sandbox)."""

    def __init__(self, env, slow_task: str, delay: float) -> None:
        self.env, self.slow_task, self.delay, self.task = env, slow_task, delay, None
        self.unwrapped = env.unwrapped

    def reset(self, **kwargs):
        self.task = kwargs["options"]["task_id"]
        return self.env.reset(**kwargs)

    def step(self, action):
        import time

        if self.task == self.slow_task:
            time.sleep(self.delay)
        return self.env.step(action)

    def close(self):
        self.env.close()


@pytest.mark.parametrize("threads", [0, 4])
def test_an_episode_waiting_on_its_environment_holds_the_others_back_only_without_env_threads(setup, threads):
    chat, all_tasks = setup
    tasks = all_tasks[:5]
    answer = ['Action: Answer\nFinal Answer: ["1"]']
    policy = ScriptedPolicy(chat, {t.task.instruction: answer for t in tasks})
    slow = tasks[0].task.task_id
    run = Rollout(
        policy,
        lambda env: _SlowStep(make_env(env, all_tasks, SQLEnvConfig()), slow, delay=1.0),
        [t.task for t in tasks],
        RolloutConfig(concurrent_episodes=5, env_threads=threads),
        source="eval",
        iteration=0,
    )
    order = [t.task.task_id for _, t in run]
    if threads:  # the others end while the slow step runs
        assert order[-1] == slow and sorted(order) == sorted(t.task.task_id for t in tasks)
    else:  # every episode waits for the slow one's step, which comes first
        assert order == [t.task.task_id for t in tasks]


def test_first_turns_drawn_again_on_the_real_engine_leave_its_prefix_cache_as_it_was(setup, tiny_model_dir):
    from agentloop.policy.base import PolicyConfig
    from agentloop.policy.hf import HFPolicy
    from agentloop.types import Attempt

    chat, tasks = setup
    config = RolloutConfig(concurrent_episodes=3, sampling=SamplingConfig(max_new_tokens=16))
    policy = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=3))
    make = lambda env: make_env(env, tasks, SQLEnvConfig(max_turns=2))  # noqa: E731
    played, _ = rollout(policy, make, [t.task for t in tasks[:3]], config, source="eval", iteration=0)
    firsts = {t.task.key: next(m for m in t.messages if m.role == "assistant") for t in played}
    # Greedy draws repeat themselves: each first turn is drawn twice more, then played as it was.
    attempts = [Attempt(t.task, avoid=(firsts[t.task.key].content.strip(),), redraws=2) for t in played]
    again, stats = rollout(policy, make, attempts, config, source="eval", iteration=0)
    assert [[m.token_ids for m in t.messages] for t in again] == [[m.token_ids for m in t.messages] for t in played]
    assert stats.redraws == 6 and stats.redrawn_tokens == 2 * sum(len(m.token_ids) for m in firsts.values())
    assert stats.generated_tokens == sum(t.generated_tokens for t in played)  # the discarded draws are not in it
    assert stats.prefix_reuse > 0 and len(policy.prefix_cache) == 0  # the cache served turns; no draw left in it
