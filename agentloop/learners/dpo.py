"""One ETO round of DPO on whole trajectories, continuing the policy's LoRA adapter (TRL's DPOTrainer).

A pair is two conversations of one task (see :func:`agentloop.learners.data.build_pairs`).
The prompt is the first user turn, which both share; chosen and rejected are the rest of
each conversation, and only their assistant tokens count in the log-probabilities: the
environment's turns inside them are masked out
(:class:`agentloop.learners.trainers.TurnMaskedPreferenceCollator`).
The loss is TRL's (``sigmoid`` = plain DPO, ETO's choice).

The reference is the policy at the start of the round, not the raw base model: the adapter
is loaded as a trainable PEFT model, and TRL 1.16's DPOTrainer, given a PeftModel without a
``peft_config``, copies the adapter into a frozen second adapter named ``ref`` and scores the
reference with it. With ``precompute_ref_log_probs`` (default) it does so once, before the
first step, instead of on every step.

Speed: on CPU TRL's fused output layer scores every position of both sequences; with
``logits_on_assistant_only`` (default) only the assistant tokens reach the 262k-word output
layer (:func:`agentloop.learners.trainers.add_compact_lm_head`), for the policy and the
reference alike. The loss is still TRL's.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agentloop.config import ConfigError
from agentloop.learners import common
from agentloop.learners.data import dpo_examples
from agentloop.types import Pair

if TYPE_CHECKING:
    from trl import DPOTrainer

logger = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "sigmoid_norm")


@dataclass
class DPOLearnerConfig:
    """DPO settings for one ETO round; defaults suit Gemma 3 270M with LoRA on a 2-core CPU."""

    beta: float = 0.1
    """Strength of the tie to the reference (ETO: 0.1)."""
    loss_type: str = "sigmoid"
    """TRL loss: sigmoid (plain DPO, ETO), ipo, hinge, robust or sigmoid_norm."""
    sft_loss_weight: float = 0.0
    """Weight of a negative log-likelihood term on the chosen side (TRL's ``sft`` loss added to
    ``loss_type``; RPO, Pang et al. 2024). 0 = plain preference loss, as in ETO. It keeps DPO
    from lowering the chosen trajectories' likelihood along with the rejected ones."""
    epochs: int = 3
    """Passes over the pairs (ETO: 3)."""
    learning_rate: float = 2e-5
    """Peak learning rate of the LoRA weights (ETO's 1e-6 is for full fine-tuning of 7B models)."""
    batch_size: int = 1
    """Pairs per forward pass (each pair is two sequences)."""
    grad_accumulation: int = 8
    """Forward passes per optimizer step."""
    max_length: int = 1024
    """Tokens per sequence, prompt included; longer ones are cut at a turn boundary and counted.
    0: an experiment fits it to its envs first, as ``experiments/eto.py`` does."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear, constant or constant_with_warmup."""
    logits_on_assistant_only: bool = True
    """Run the output layer only on scored tokens (``trainers.add_compact_lm_head``); TRL's loss either way."""
    precompute_ref_log_probs: bool = True
    """Score the reference once before training (TRL option) instead of once per step and epoch."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    dtype: str = "auto"
    """Weights and autocast dtype: bfloat16, float32, or ``auto`` (bfloat16 where the hardware computes it
    natively, :func:`agentloop.config.resolve_dtype`)."""
    seed: int = 0
    """Seed for data order."""
    keep_memory: bool = False
    """Train on the memory an episode was shown (STE's trials) as part of its prompt; by default
    it is stripped, so that trials of one task share the task's prompt."""
    replay_fraction: float = 0.0
    """Share of earlier rounds' pairs the loop mixes into a round, per env (``data.mix_replay_per_env``); 0 = none."""

    def validate(self) -> None:
        """Raises ``ConfigError`` on an out-of-range field."""
        common.check_training_fields(self)
        if not self.beta > 0:
            raise ConfigError(f"beta: must be positive, got {self.beta}")
        if not 0 <= self.replay_fraction <= 1:
            raise ConfigError(f"replay_fraction: must be in [0, 1], got {self.replay_fraction}")
        if not self.sft_loss_weight >= 0:
            raise ConfigError(f"sft_loss_weight: must be >= 0, got {self.sft_loss_weight}")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type: {self.loss_type!r} is not one of {list(LOSS_TYPES)}")


def loss_terms(config: DPOLearnerConfig) -> dict[str, list]:
    """TRL's ``loss_type`` and ``loss_weights``: the preference loss, plus the chosen side's NLL if weighted."""
    if config.sft_loss_weight == 0:
        return {"loss_type": [config.loss_type], "loss_weights": None}
    return {"loss_type": [config.loss_type, "sft"], "loss_weights": [1.0, config.sft_loss_weight]}


def build_dpo_trainer(
    base_model: Path,
    adapter: Path,
    pairs: Sequence[Pair],
    config: DPOLearnerConfig,
    work_dir: Path,
) -> tuple[DPOTrainer | None, dict[str, float]]:
    """The configured trainer (``None`` when no pair is left) and the data sizes.

    Building the trainer precomputes the reference log-probs when the config asks for it;
    its duration is ``timing/dpo_setup``.
    """
    from datasets import Dataset
    from trl import DPOConfig

    from agentloop.learners.trainers import PretokenizedDPOTrainer, TurnMaskedPreferenceCollator
    from agentloop.policy.chat import ChatTokenizer

    tokenizer = common.load_tokenizer(base_model)
    examples, report = dpo_examples(pairs, ChatTokenizer(tokenizer), config.max_length, config.keep_memory)
    tokens = sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
    sizes = {
        "dpo/pairs": float(len(examples)),
        "dpo/train_tokens": float(tokens),
        "dpo/assistant_tokens": float(sum(sum(e["chosen_mask"]) + sum(e["rejected_mask"]) for e in examples)),
        **report.metrics("dpo", "pairs"),
    }
    if not examples:
        return None, sizes
    args = DPOConfig(
        **common.training_arguments(config, work_dir),
        beta=config.beta,
        **loss_terms(config),
        max_length=None,  # dpo_examples already cut each side at a turn boundary
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        remove_unused_columns=False,  # the turn masks must reach the collator
    )
    model = common.load_policy(base_model, adapter, config.dtype)
    start = time.perf_counter()
    trainer = PretokenizedDPOTrainer(
        model=model,
        args=args,
        data_collator=TurnMaskedPreferenceCollator(pad_token_id=tokenizer.pad_token_id),
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        compact_lm_head=config.logits_on_assistant_only,
    )
    if "ref" not in trainer.model.peft_config:
        raise RuntimeError("TRL did not create the 'ref' adapter: the reference would be the raw base model")
    sizes["timing/dpo_setup"] = time.perf_counter() - start
    return common.quiet(trainer), sizes


def train_dpo(
    base_model: Path,
    adapter: Path,
    pairs: Sequence[Pair],
    config: DPOLearnerConfig,
    output_dir: Path,
) -> dict[str, float]:
    """Continues training the adapter with DPO on the pairs and saves the result.

    Args:
        base_model: The fixed base checkpoint directory.
        adapter: The policy's adapter at the start of the round (also the reference).
        pairs: Preference pairs; trajectories may come without tokens.
        config: Training settings.
        output_dir: Where the new adapter is saved. With no usable pair the start adapter
            is copied there unchanged (``dpo/pairs`` = 0).

    Returns:
        ``dpo/loss`` (mean over steps), ``dpo/loss_first``, ``dpo/loss_last``,
        ``dpo/rewards/margins``, ``dpo/rewards/accuracies``, ``dpo/rewards/chosen``,
        ``dpo/rewards/rejected`` (means over steps), ``dpo/steps``, ``dpo/pairs``,
        ``dpo/train_tokens``, ``dpo/assistant_tokens`` (one epoch), ``dpo/tokens_per_s``
        (reference precomputation included), ``timing/dpo_setup``, ``timing/dpo_train``
        and ``timing/dpo`` (the whole call).
    """
    start = time.perf_counter()
    output_dir = Path(output_dir)
    with tempfile.TemporaryDirectory(prefix="agentloop-dpo-") as work_dir:
        trainer, metrics = build_dpo_trainer(base_model, adapter, pairs, config, Path(work_dir))
        if trainer is None:
            logger.warning("no DPO pair to train on; the adapter is copied unchanged to %s", output_dir)
            shutil.copytree(adapter, output_dir, dirs_exist_ok=True)
        else:
            keys = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
            tokens = int(metrics["dpo/train_tokens"])
            metrics |= common.run_training(trainer, "dpo", tokens, metrics["timing/dpo_setup"], keys)
            common.save_adapter(trainer.model, output_dir)
    metrics["timing/dpo"] = time.perf_counter() - start
    logger.info("DPO done: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics
