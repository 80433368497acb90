"""LoRA SFT on the tiny model: the mask, the loss against plain TRL's, training and the saved adapter."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agentloop.config import ConfigError, from_dict
from agentloop.learners.sft import SFTLearnerConfig, build_sft_trainer, train_sft
from agentloop.types import Message, Task, Trajectory

FAST = SFTLearnerConfig(
    epochs=3,
    learning_rate=1e-2,
    batch_size=2,
    grad_accumulation=1,
    warmup_ratio=0.0,
    scheduler="constant",
    lora_r=4,
    lora_alpha=8,
)


def conversation(i: int) -> Trajectory:
    """A two-turn database episode, as an expert would give it (text only, no tokens)."""
    messages = (
        Message("user", f"The name of this table is Results, and the headers are Name, Year. Row {i}?"),
        Message("assistant", f"Action: Operation\n```sql\nSELECT * FROM `table` WHERE x = '{i}';\n```"),
        Message("user", f"[('Women +60kg Bronze', {i})]"),
        Message("assistant", f'Action: Answer\nFinal Answer: ["{i}"]'),
    )
    return Trajectory(
        task=Task("db", f"t{i}", "train", "SELECT", "q"),
        messages=messages,
        tokenizer="",
        reward=1.0,
        success=True,
        terminated=True,
        truncated=False,
        num_turns=2,
        invalid_actions=0,
        source="expert",
        policy_version=-1,
        iteration=0,
    )


DATA = [conversation(i) for i in range(4)]


def test_trained_tokens_are_exactly_the_assistant_turns(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer, sizes = build_sft_trainer(tiny_model_dir, DATA, FAST, tmp_path)
    tokenizer = trainer.processing_class
    for row, trajectory in zip(trainer.train_dataset, DATA, strict=True):
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        expected = "".join(m.content + "<end_of_turn>" for m in trajectory.messages if m.role == "assistant")
        assert tokenizer.decode(trained) == expected
    assert sizes["sft/examples"] == 4
    assert 0 < sizes["sft/assistant_tokens"] < sizes["sft/train_tokens"]


@pytest.mark.parametrize("padding_free", [True, False])
def test_assistant_only_logits_give_plain_trl_loss_and_gradients(
    tiny_model_dir: Path, tmp_path: Path, padding_free: bool
) -> None:
    import torch

    exact = replace(FAST, dtype="float32", lora_dropout=0.0, lora_target_modules=("q_proj", "down_proj"))
    plain, _ = build_sft_trainer(
        tiny_model_dir, DATA, replace(exact, logits_on_assistant_only=False, padding_free=False), tmp_path / "a"
    )
    ours, _ = build_sft_trainer(
        tiny_model_dir, DATA, replace(exact, logits_on_assistant_only=True, padding_free=padding_free), tmp_path / "b"
    )
    assert type(plain).__name__ == "SFTTrainer" and type(ours).__name__ == "AssistantLogitsSFTTrainer"
    # a non-zero adapter, identical in both, so the LoRA path matters
    torch.manual_seed(0)
    for (name, p), (other, q) in zip(plain.model.named_parameters(), ours.model.named_parameters(), strict=True):
        assert name == other
        if p.requires_grad:
            with torch.no_grad():
                q.copy_(p.copy_(torch.randn_like(p) * 0.1))
    results = []
    for trainer in (plain, ours):
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6)


def test_two_steps_at_a_large_learning_rate_train_and_save_a_loadable_adapter(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    metrics = train_sft(tiny_model_dir, DATA, FAST, tmp_path / "adapter")
    assert metrics["sft/steps"] == 6
    assert metrics["sft/loss_last"] < metrics["sft/loss_first"]
    assert metrics["sft/tokens_per_s"] > 0 and metrics["timing/sft"] >= metrics["timing/sft_train"]
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved and "tokenizer.json" not in saved
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # LoRA B starts at zero: the weights moved

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ids = torch.tensor([[2, 10, 20, 30]])
    before = base(ids).logits
    policy = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert not torch.allclose(policy(ids).logits, before)


def test_training_continues_a_given_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    one_step = replace(FAST, epochs=1)
    train_sft(tiny_model_dir, DATA[:2], one_step, tmp_path / "first")
    train_sft(tiny_model_dir, DATA[:2], one_step, tmp_path / "second", adapter=tmp_path / "first")
    first = load_file(tmp_path / "first" / "adapter_model.safetensors")
    second = load_file(tmp_path / "second" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert any(not first[k].equal(second[k]) for k in first)


def test_config_is_validated() -> None:
    assert from_dict(SFTLearnerConfig, {"epochs": 1}).epochs == 1
    for bad in ({"epochs": 0}, {"warmup_ratio": 1.5}, {"dtype": "float16"}, {"lora_r": 0}):
        with pytest.raises(ConfigError):
            from_dict(SFTLearnerConfig, bad)
