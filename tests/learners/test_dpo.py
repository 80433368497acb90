"""DPO rounds on the tiny model: the reference is the start-of-round policy, masks, training, saving."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agentloop.config import ConfigError, from_dict
from agentloop.learners.data import build_pairs
from agentloop.learners.dpo import DPOLearnerConfig, build_dpo_trainer, train_dpo
from agentloop.types import Message, Task, Trajectory

FAST = DPOLearnerConfig(
    epochs=4,
    learning_rate=1e-2,
    batch_size=2,
    grad_accumulation=1,
    warmup_ratio=0.0,
    scheduler="constant",
    dtype="float32",
)


def episode(i: int, good: bool) -> Trajectory:
    """The expert's two-turn solution of task ``i``, or a failed exploration of it."""
    action = f"Action: Operation\n```sql\nSELECT * FROM `table` WHERE x = '{i}';\n```" if good else "Action: Answer"
    messages = (
        Message("user", f"The name of this table is Results, and the headers are Name, Year. Row {i}?"),
        Message("assistant", action),
        Message("user", "[('Women +60kg Bronze',)]" if good else "Error: no such column."),
        Message("assistant", f'Action: Answer\nFinal Answer: ["{i}"]' if good else 'Final Answer: ["y"]'),
    )
    return Trajectory(
        task=Task("db", f"t{i}", "train", "SELECT", "q"),
        messages=messages,
        tokenizer="",
        reward=float(good),
        success=good,
        terminated=True,
        truncated=False,
        num_turns=2,
        invalid_actions=0,
        source="expert" if good else "explore",
        policy_version=-1 if good else 1,
        iteration=1,
    )


PAIRS = build_pairs([episode(i, True) for i in range(4)], [episode(i, False) for i in range(4)], iteration=1)


@pytest.fixture(scope="module")
def start_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved adapter with random, non-zero LoRA weights: the policy differs from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    out = tmp_path_factory.mktemp("start-adapter")
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def assistant_logps(model, example: dict, side: str) -> float:
    """Sum of the model's log-probabilities of ``side``'s assistant tokens, computed directly."""
    import torch

    ids = example["prompt_ids"] + example[f"{side}_ids"]
    mask = [0] * len(example["prompt_ids"]) + example[f"{side}_mask"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float((token_logps * torch.tensor(mask[1:])).sum())


def load(tiny_model_dir: Path, adapter: Path | None):
    """The base model, or base + adapter, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    return (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()


def test_precomputed_reference_is_the_start_of_round_policy(
    tiny_model_dir: Path, start_adapter: Path, tmp_path: Path
) -> None:
    trainer, _ = build_dpo_trainer(tiny_model_dir, start_adapter, PAIRS, FAST, tmp_path)
    assert trainer.model.get_base_model().compact_lm_head_stats  # off only while the reference was scored
    policy, base = load(tiny_model_dir, start_adapter), load(tiny_model_dir, None)
    away_from_base = []
    for row in trainer.train_dataset:
        for side in ("chosen", "rejected"):
            reference = row[f"ref_{side}_logps"]
            assert reference == pytest.approx(assistant_logps(policy, row, side), abs=1e-3)
            away_from_base.append(abs(reference - assistant_logps(base, row, side)))
    assert max(away_from_base) > 0.3  # the raw base model scores these sequences differently


def test_reference_stays_the_start_policy_while_the_adapter_trains(
    tiny_model_dir: Path, start_adapter: Path, tmp_path: Path
) -> None:
    import torch

    online = replace(FAST, precompute_ref_log_probs=False, epochs=1)
    trainer, _ = build_dpo_trainer(tiny_model_dir, start_adapter, PAIRS, online, tmp_path)
    trainer.train()
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    policy = load(tiny_model_dir, start_adapter)
    expected = [[assistant_logps(policy, row, side) for row in rows] for side in ("chosen", "rejected")]
    torch.testing.assert_close(chosen, torch.tensor(expected[0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(rejected, torch.tensor(expected[1]), atol=1e-3, rtol=0)
    trained = trainer.model.eval()
    assert abs(assistant_logps(trained, rows[0], "chosen") - expected[0][0]) > 0.05


def test_collator_scores_only_the_assistant_turns(tiny_model_dir: Path, start_adapter: Path, tmp_path: Path) -> None:
    trainer, _ = build_dpo_trainer(tiny_model_dir, start_adapter, PAIRS[:2], FAST, tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    tokenizer = trainer.processing_class
    sides = [p.chosen for p in PAIRS[:2]] + [p.rejected for p in PAIRS[:2]]
    for ids, mask, trajectory in zip(batch["input_ids"], batch["completion_mask"], sides, strict=True):
        expected = "".join(m.content + "<end_of_turn>" for m in trajectory.messages if m.role == "assistant")
        assert tokenizer.decode(ids[mask.bool()]) == expected


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_chunked_log_probs_match_full_logits_values_and_gradients(softcap) -> None:
    import torch

    from agentloop.learners.trainers import ChunkedTokenLogProbs

    torch.manual_seed(0)
    hidden = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    upstream = torch.randn(10, dtype=torch.float64)

    logits = hidden @ weight.t()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    expected = logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    (expected * upstream).sum().backward()
    want = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    log_probs, entropy, mean_logits, is_top1 = ChunkedTokenLogProbs.apply(hidden, weight, targets, softcap, 3)
    (log_probs * upstream).sum().backward()
    torch.testing.assert_close(log_probs, expected.float().detach())
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-6)  # fp32 softmax inside
    torch.testing.assert_close(weight.grad, want[1], rtol=1e-5, atol=1e-6)
    probs = logits.softmax(-1)
    torch.testing.assert_close(entropy, -(probs * probs.log()).sum(-1).float().detach())
    torch.testing.assert_close(mean_logits, logits.mean(-1).float().detach())
    assert torch.equal(is_top1, logits.argmax(-1) == targets)

    hidden.grad = weight.grad = None  # without the statistics (reference log-probs): same values and gradients
    log_probs, entropy, mean_logits, is_top1 = ChunkedTokenLogProbs.apply(hidden, weight, targets, softcap, 3, False)
    (log_probs * upstream).sum().backward()
    torch.testing.assert_close(log_probs, expected.float().detach())
    torch.testing.assert_close(hidden.grad, want[0], rtol=1e-5, atol=1e-6)
    assert entropy.isnan().all() and mean_logits.isnan().all() and not is_top1.any()


def test_compact_lm_head_gives_trl_loss_gradients_and_metrics(
    tiny_model_dir: Path, start_adapter: Path, tmp_path: Path
) -> None:
    import torch

    online = replace(FAST, precompute_ref_log_probs=False)
    results = []
    for compact in (False, True):
        config = replace(online, logits_on_assistant_only=compact)
        trainer, _ = build_dpo_trainer(tiny_model_dir, start_adapter, PAIRS, config, tmp_path / str(compact))
        with torch.no_grad():  # move the trained adapter away from the reference, identically in both
            torch.manual_seed(0)
            for name, p in trainer.model.named_parameters():
                if ".default." in name:
                    p.add_(torch.randn_like(p) * 0.05)
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        results.append((loss.item(), grads, metrics))
    (loss, grads, metrics), (compact_loss, compact_grads, compact_metrics) = results
    assert compact_loss == pytest.approx(loss, rel=1e-5) and loss != pytest.approx(0.6931, abs=1e-3)
    assert grads.keys() == compact_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(compact_grads[name], grad, rtol=1e-4, atol=1e-6)
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "logits/chosen"):
        assert compact_metrics[key] == pytest.approx(metrics[key], rel=1e-4, abs=1e-5), key


def test_a_round_raises_the_margin_and_saves_only_the_policy_adapter(
    tiny_model_dir: Path, start_adapter: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    metrics = train_dpo(tiny_model_dir, start_adapter, PAIRS, FAST, tmp_path / "out")
    assert metrics["dpo/pairs"] == 4 and metrics["dpo/steps"] == 8
    assert metrics["dpo/loss_first"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert metrics["dpo/loss_last"] < metrics["dpo/loss_first"]
    assert metrics["dpo/rewards/margins"] > 0 and metrics["dpo/rewards/accuracies"] > 0.5
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == []  # no "ref" adapter saved
    start = load_file(start_adapter / "adapter_model.safetensors")
    new = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert start.keys() == new.keys()
    assert any(not torch.equal(start[k], new[k]) for k in start)


def test_chosen_nll_term_adds_to_the_loss_and_raises_the_chosen_side(
    tiny_model_dir: Path, start_adapter: Path, tmp_path: Path
) -> None:
    from agentloop.learners.dpo import loss_terms

    config = replace(FAST, sft_loss_weight=1.0)
    assert loss_terms(config) == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}
    assert loss_terms(FAST) == {"loss_type": ["sigmoid"], "loss_weights": None}
    metrics = train_dpo(tiny_model_dir, start_adapter, PAIRS, config, tmp_path / "out")
    # Step 1: the preference term is log 2 and the random policy's NLL per chosen token is large.
    assert metrics["dpo/loss_first"] > 0.6931 + 1.0
    assert metrics["dpo/loss_last"] < metrics["dpo/loss_first"]
    assert metrics["dpo/rewards/chosen"] > 0 and metrics["dpo/rewards/margins"] > 0


def test_a_round_without_pairs_keeps_the_adapter(tiny_model_dir: Path, start_adapter: Path, tmp_path: Path) -> None:
    metrics = train_dpo(tiny_model_dir, start_adapter, [], FAST, tmp_path / "out")
    assert metrics["dpo/pairs"] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (
        start_adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_config_is_validated() -> None:
    assert from_dict(DPOLearnerConfig, {"beta": 0.5}).beta == 0.5
    for bad in (
        {"beta": 0.0},
        {"loss_type": "kto"},
        {"batch_size": 0},
        {"scheduler": "step"},
        {"replay_fraction": 1.5},
        {"sft_loss_weight": -1.0},
    ):
        with pytest.raises(ConfigError):
            from_dict(DPOLearnerConfig, bad)
