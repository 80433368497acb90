"""The transformers backend on a tiny random model: batching, stops, adapters."""

from __future__ import annotations

import pytest
from assets import check_min_p

from agentloop.config import ConfigError
from agentloop.policy.base import PolicyConfig, SamplingConfig
from agentloop.policy.hf import HFPolicy


def assert_same_generations(ours, theirs) -> None:
    """Same tokens, text, end and version; log-probs equal up to float rounding (a row's
    arithmetic depends a little on what it is batched with)."""
    assert [(g.token_ids, g.text, g.finished, g.version) for g in ours] == [
        (g.token_ids, g.text, g.finished, g.version) for g in theirs
    ]
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.logprobs) == len(a.token_ids) and len(b.logprobs) == len(b.token_ids)
        assert all(abs(x - y) < 1e-4 for x, y in zip(a.logprobs, b.logprobs, strict=True))


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=4))


def test_batched_greedy_equals_one_by_one(policy):
    prompts = [
        policy.chat.user_segment(text, first=True) for text in ["hi", "SELECT * FROM t", "a much longer prompt here"]
    ]
    sampling = SamplingConfig(max_new_tokens=6)
    batched = policy.generate(prompts, sampling)
    single = [policy.generate([p], sampling)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in single]
    for gen in batched:
        assert 0 < len(gen.token_ids) <= 6
        assert gen.finished == (gen.token_ids[-1] in policy.chat.stop_ids)


def test_rows_that_stop_leave_the_batch_and_match_transformers_generate(policy, monkeypatch):
    import torch

    prompts = [policy.chat.user_segment(text, first=True) for text in ["a", "bb cc", "SELECT 1", "x y z w", "q"]]
    sampling = SamplingConfig(max_new_tokens=10)
    free = policy.generate(prompts, sampling)
    # Declare tokens the rows actually produce as stops, so rows end at different steps.
    stops = (free[0].token_ids[2], free[3].token_ids[5])
    monkeypatch.setattr(policy.chat, "stop_ids", stops)
    batched = policy.generate(prompts, sampling)
    assert any(g.finished for g in batched) and any(len(g.token_ids) < 10 for g in batched)
    for prompt, gen in zip(prompts, batched, strict=True):
        with torch.no_grad():
            ref = policy.model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=list(stops)
            )[0, len(prompt) :].tolist()
        assert list(gen.token_ids) == ref[: len(gen.token_ids)]
        assert gen.finished == (ref[len(gen.token_ids) - 1] in stops)


def test_sampling_is_seeded(policy, tiny_model_dir):
    prompts = [policy.chat.user_segment(text, first=True) for text in ["a", "bb cc"]]
    hot = SamplingConfig(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=3)
    runs = []
    for _ in range(2):
        fresh = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"))
        runs.append([fresh.generate(prompts, hot) for _ in range(2)])
    assert runs[0] == runs[1]
    assert runs[0][0] != policy.generate(prompts, SamplingConfig(max_new_tokens=8))


def test_min_p_keeps_only_tokens_near_the_likeliest(policy):
    check_min_p(policy, policy.model)


def test_sampling_settings_are_checked():
    for bad in (dict(min_p=1.0), dict(min_p=-0.1), dict(top_p=0.0), dict(temperature=-1.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingConfig(**bad).validate()


def test_a_request_can_sample_while_the_rest_of_its_batch_stays_greedy(policy):
    prompts = [policy.chat.user_segment(text, first=True) for text in ["a", "bb cc", "SELECT 1", "x y z w"]]
    greedy = policy.generate(prompts, SamplingConfig(max_new_tokens=8))
    stream = policy.stream(SamplingConfig(max_new_tokens=8, seed=5))
    for i, prompt in enumerate(prompts):
        stream.add(i, prompt, temperature=2.0 if i % 2 else None)  # odd rows sample, even ones keep the stream's 0
    out = {}
    while stream.busy:
        out.update(stream.step())
    assert_same_generations([out[0], out[2]], [greedy[0], greedy[2]])
    assert [out[1].token_ids, out[3].token_ids] != [greedy[1].token_ids, greedy[3].token_ids]
    # and the other way round: a greedy request inside a sampling stream
    stream = policy.stream(SamplingConfig(max_new_tokens=8, temperature=2.0, seed=5))
    stream.add("greedy", prompts[1], temperature=0.0)
    stream.add("hot", prompts[1])
    while stream.busy:
        out.update(stream.step())
    assert out["greedy"].token_ids == greedy[1].token_ids != out["hot"].token_ids
    # and a request with a shorter budget of new tokens than the stream's
    stream = policy.stream(SamplingConfig(max_new_tokens=8))
    stream.add("short", prompts[3], max_new_tokens=3)
    stream.add("long", prompts[3])
    while stream.busy:
        out.update(stream.step())
    assert out["long"].token_ids == greedy[3].token_ids and out["short"].token_ids == greedy[3].token_ids[:3]


def test_later_turns_resume_from_the_prefix_cache_with_the_same_result(tiny_model_dir):
    cached = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=3))
    plain = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=3, prefix_cache_tokens=0))
    chat = cached.chat
    texts = ["SELECT a FROM t WHERE b = 'x y z'", "hi", "INSERT INTO t VALUES (1, 2, 3)", "Error: near"]
    conversations = [list(chat.user_segment(t, first=True)) for t in texts]
    sampling = SamplingConfig(max_new_tokens=12)
    for turn in range(3):
        ours, reference = cached.generate(conversations, sampling), plain.generate(conversations, sampling)
        assert [g.token_ids for g in ours] == [g.token_ids for g in reference], turn
        # from the second turn on, every conversation resumed from its cached first turns
        assert cached.prefix_cache.hits == turn * len(conversations)
        for conversation, gen, text in zip(conversations, ours, texts, strict=True):
            conversation += [*gen.token_ids, *chat.user_segment(f"Observation {turn}: {text[::-1]}", first=False)]
    assert max(len(c) for c in conversations) > 3 * 16  # well past the sliding window
    cached.load_adapter(None, version=0)
    assert len(cached.prefix_cache) == 0  # new weights, stale keys and values dropped


def test_compacting_the_cache_changes_nothing(policy, monkeypatch):
    from agentloop.policy.decode import DecodeEngine

    prompts = [policy.chat.user_segment(text, first=True) for text in ["a", "bb cc dd ee ff", "SELECT 1", "x"]]
    sampling = SamplingConfig(max_new_tokens=10)
    expected = policy.generate(prompts, sampling)
    monkeypatch.setattr(DecodeEngine, "_sparse", lambda self: True)  # compact after every step
    assert policy.generate(prompts, sampling) == expected


@pytest.mark.parametrize("slack", [512, 0])
def test_requests_joining_a_running_batch_take_idle_slots_with_the_same_result(tiny_model_dir, monkeypatch, slack):
    """A stream fed one prompt at a time, as the rollout feeds it: requests end at different
    steps, later ones (some longer than the running batch is wide, some resuming from the
    prefix cache) take the idle slots, and the batch shrinks when it runs dry. Every
    completion equals decoding its prompt alone without a cache. With no slack for padding,
    an admission of rows with different numbers of new tokens is prefilled in several groups."""
    from agentloop.policy import decode
    from agentloop.policy.decode import DecodeEngine, KVBuffer

    monkeypatch.setattr(decode, "PREFILL_SLACK", slack)

    cached = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=3))
    plain = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", prefix_cache_tokens=0))
    chat = cached.chat
    texts = ["a", "bb cc", "SELECT 1", "q", "x y z w " * 10, "INSERT INTO t VALUES (1, 2)", "z", "long " * 30]
    sampling = SamplingConfig(max_new_tokens=12)
    free = plain.generate([chat.user_segment(t, first=True) for t in texts], sampling)
    stops = (free[0].token_ids[1], free[2].token_ids[6], free[5].token_ids[3])  # rows end at different steps
    for p in (cached, plain):
        monkeypatch.setattr(p.chat, "stop_ids", stops)
    calls = {"write": 0, "pad_left": 0, "drop_left": 0, "shrink": 0, "admit": 0, "prefill": 0}
    changes = [(KVBuffer, "write"), (KVBuffer, "pad_left"), (KVBuffer, "drop_left"), (DecodeEngine, "_shrink")]
    for cls, name in [*changes, (DecodeEngine, "_admit"), (DecodeEngine, "_prefill")]:
        original, label = getattr(cls, name), name.strip("_")

        def counted(self, *args, _original=original, _name=label, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)

    conversations = [list(chat.user_segment(t, first=True)) for t in texts]
    for turn in range(2):
        expected = [plain.generate([c], sampling)[0] for c in conversations]
        stream, got, pending, widest = cached.stream(sampling), {}, list(range(len(texts))), 0
        while pending or stream.busy:
            if pending:
                stream.add(pending[0], conversations[pending.pop(0)])
            got.update(stream.step())
            widest = max(widest, len(stream.engine.slots))
        assert_same_generations([got[i] for i in range(len(texts))], expected)
        assert widest <= 3
        for conversation, gen, text in zip(conversations, expected, texts, strict=True):
            conversation += [*gen.token_ids, *chat.user_segment(f"Observation {turn}: {text[:7]}", first=False)]
    assert cached.prefix_cache.hits >= len(texts)  # the second turn resumed from the first
    assert all(calls.values()), calls  # each way of changing the batch in place was taken
    assert (calls["prefill"] > calls["admit"]) == (slack == 0), calls  # admissions split only without slack


def test_an_admission_is_prefilled_in_groups_whose_padding_stays_small():
    from agentloop.policy.decode import PREFILL_SLACK, prefill_groups

    assert PREFILL_SLACK == 512
    assert prefill_groups([100] * 8) == [list(range(8))]  # no padding at all
    # continuing conversations (a short observation each), one new conversation, one long page
    assert prefill_groups([5, 2000, 7, 6, 300]) == [[0, 3, 2], [4], [1]]
    assert prefill_groups([40, 90, 10, 250]) == [[2, 0, 1, 3]]  # 1,000 padded for 390 real: within the slack
    assert prefill_groups([40, 90, 10, 600]) == [[2, 0, 1], [3]]  # 2,400 for 740: not
    assert prefill_groups([]) == []


def test_grouped_attention_equals_transformers_sdpa(tiny_model_dir):
    import torch

    grouped = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"))
    assert grouped.model.config._attn_implementation == "agentloop_sdpa"
    texts = ["a", "SELECT a FROM t WHERE b = 'x y z' AND c > 3", "hi there"]
    prompts = [grouped.chat.user_segment(t, first=True) for t in texts]
    sampling = SamplingConfig(max_new_tokens=30)
    ours = grouped.generate(prompts, sampling)
    grouped.model.set_attn_implementation("sdpa")
    assert [g.token_ids for g in grouped.generate(prompts, sampling)] == [g.token_ids for g in ours]
    batch = torch.tensor([prompts[1]] * 2)
    padded = torch.ones_like(batch)
    padded[0, :5] = 0
    for mask in (padded, None):  # with padding, and plain causal (the mask transformers may leave out)
        with torch.no_grad():
            grouped.model.set_attn_implementation("sdpa")
            reference = grouped.model(input_ids=batch, attention_mask=mask).logits
            grouped.model.set_attn_implementation("agentloop_sdpa")
            assert torch.allclose(grouped.model(input_ids=batch, attention_mask=mask).logits, reference, atol=1e-5)


def test_a_local_layer_is_masked_over_only_the_columns_its_window_reaches():
    import torch

    from agentloop.policy.decode import ATTENTION, _masks

    class Grouped:
        _attn_implementation, layer_types = ATTENTION, ["sliding_attention", "full_attention"]

    class Plain(Grouped):
        _attn_implementation = "sdpa"

    # two rows decoding: one 20 tokens long, one 15 after 5 columns of padding; the new query on the right
    key_pos = torch.tensor([list(range(21)), [-1] * 5 + list(range(16))])
    query_pos = key_pos[:, -1:]
    narrow, full = _masks(Grouped, query_pos, key_pos, 4), _masks(Plain, query_pos, key_pos, 4)
    assert full["sliding_attention"].shape[-1] == full["full_attention"].shape[-1] == 21
    assert narrow["sliding_attention"].shape[-1] == 4  # positions 17-20 and 12-15: the last 4 columns
    assert torch.equal(narrow["sliding_attention"], full["sliding_attention"][..., -4:])
    assert not full["sliding_attention"][..., :-4].any()  # nothing attended is left out
    assert torch.equal(narrow["full_attention"], full["full_attention"])


def test_completion_stops_at_stop_token(policy):
    stop = policy.chat.stop_id
    gen = policy._completion([7, 8, stop, 9, 9], [-1.0, -2.0, -0.5, -3.0, -3.0])
    assert gen.token_ids == (7, 8, stop) and gen.finished and gen.logprobs == (-1.0, -2.0, -0.5)
    assert gen.text == policy.chat.tokenizer.decode([7, 8]) and gen.version == policy.version
    assert not policy._completion([7, 8, 9], [-1.0, -1.0, -1.0]).finished


def test_adapter_changes_outputs_and_base_is_restored(policy, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    prompt = [policy.chat.user_segment("SELECT", first=True)]
    sampling = SamplingConfig(max_new_tokens=8)
    base_logits = _logits(policy, prompt[0])

    model = AutoModelForCausalLM.from_pretrained(policy.chat.tokenizer.name_or_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")

    policy.load_adapter(tmp_path / "adapter", version=3)
    assert policy.version == 3
    assert not torch.allclose(_logits(policy, prompt[0]), base_logits)
    policy.generate(prompt, sampling)
    policy.load_adapter(None, version=0)
    assert torch.allclose(_logits(policy, prompt[0]), base_logits)


def test_a_sleeping_policy_frees_its_weights_and_wakes_with_its_adapter(tiny_model_dir, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter"
    )
    policy.load_adapter(tmp_path / "adapter", version=2)
    prompts = [policy.chat.user_segment("SELECT", first=True)]
    sampling = SamplingConfig(max_new_tokens=8)
    before = policy.generate(prompts, sampling)
    policy.sleep()
    assert policy.asleep and policy.model is None
    assert policy.generate(prompts, sampling) == before  # woke up with the same adapter merged
    assert policy.version == 2 and not policy.asleep
    policy.sleep()
    policy.load_adapter(None, version=0)  # waking by loading another adapter
    policy.sleep()
    policy.load_adapter(tmp_path / "adapter", version=4)
    again = policy.generate(prompts, sampling)
    assert [g.token_ids for g in again] == [g.token_ids for g in before] and again[0].version == 4


def test_adapter_that_changes_the_embeddings_is_refused(policy, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(policy.chat.tokenizer.name_or_path, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    peft.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="embeddings"):
        policy.load_adapter(tmp_path / "adapter", version=5)


def _logits(policy, prompt):
    import torch

    with torch.no_grad():
        return policy.model(input_ids=torch.tensor([prompt])).logits


def test_a_publish_mid_stream_restarts_running_requests_under_the_new_version(tiny_model_dir, tmp_path):
    """As the vLLM backend does: a new version while requests run restarts them, so every
    completion is one version's, the one it reports, and equals that version's from scratch."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32", batch_size=3))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        tmp_path / "adapter"
    )
    prompts = [policy.chat.user_segment(t, first=True) for t in ["a", "bb cc", "SELECT 1", "x y z w", "q"]]
    sampling = SamplingConfig(max_new_tokens=12)
    base = policy.generate(prompts, sampling)
    stream = policy.stream(sampling)
    for i, prompt in enumerate(prompts):
        stream.add(i, prompt)
    done = dict(stream.step())
    stream.step()
    assert stream.engine.running  # requests are mid-turn
    policy.load_adapter(tmp_path / "adapter", version=5)
    while stream.busy:
        done.update(stream.step())
    fresh = policy.generate(prompts, sampling)
    assert [g.token_ids for g in fresh] != [g.token_ids for g in base]
    assert_same_generations([done[i] for i in range(len(prompts))], fresh)
    assert {g.version for g in done.values()} == {5}


def test_draw_samples_each_token_as_often_as_its_probability_and_never_a_cut_one():
    import torch

    from agentloop.policy.hf import draw

    probs = torch.tensor([0.5, 0.0, 0.3, 0.2])
    logits = probs.log().repeat(20_000, 1)  # the token of probability 0 has logit -inf, as top-p leaves it
    drawn = draw(logits, torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[1] == 0 and torch.allclose(counts, probs, atol=0.015)
    assert drawn.dtype == torch.long and drawn.shape == (20_000,)
