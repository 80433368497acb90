"""Behaviour cloning: LoRA SFT with the loss on assistant tokens only (TRL's SFTTrainer).

The training set is pre-tokenized by :func:`agentloop.learners.data.sft_examples`: the
exact tokens of each conversation with an ``assistant_masks`` column, which TRL folds into
its labels (-100 elsewhere). The loss is TRL's/transformers' token-level cross-entropy.

Speed: with a 262k-word vocabulary the output layer dominates a step. TRL 1.16 projects
through it only the positions that carry a label on Triton devices; on CPU its fused head
scores every position. With ``logits_on_assistant_only`` the thin subclass
:class:`agentloop.learners.trainers.AssistantLogitsSFTTrainer` passes the positions whose next token is trained to the
model as ``logits_to_keep`` and scores them with the model's own loss function, so the
output layer runs on assistant tokens only and the loss is unchanged.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agentloop.config import ConfigError
from agentloop.learners import common
from agentloop.learners.data import sft_examples
from agentloop.types import Trajectory

if TYPE_CHECKING:
    from trl import SFTTrainer

logger = logging.getLogger(__name__)


@dataclass
class SFTLearnerConfig:
    """LoRA SFT settings; defaults suit Gemma 3 270M on a 2-core CPU (see STACK.md)."""

    epochs: int = 3
    """Passes over the training set (ETO: 3)."""
    learning_rate: float = 2e-4
    """Peak learning rate of the LoRA weights."""
    batch_size: int = 2
    """Conversations per forward pass."""
    grad_accumulation: int = 8
    """Forward passes per optimizer step (effective batch = batch_size * grad_accumulation)."""
    max_length: int = 1024
    """Tokens per conversation; longer ones are cut at a turn boundary and counted (see ``sft_examples``).
    0: an experiment fits it to its envs first, as ``experiments/eto.py`` does."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly (ETO: 3%)."""
    scheduler: str = "cosine"
    """Learning-rate schedule after warm-up: cosine, linear, constant or constant_with_warmup."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """Modules that get LoRA: ``("all-linear",)`` (every linear layer but the output layer) or names."""
    logits_on_assistant_only: bool = True
    """Compute the output layer only where the loss needs it (see the module docstring)."""
    padding_free: bool = True
    """Flatten each batch into one unpadded row (TRL's ``padding_free``): no compute on padding."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    dtype: str = "auto"
    """Weights and autocast dtype: bfloat16 (AMX/AVX-512 bf16 is ~3x fp32 on CPU), float32, or ``auto``
    (bfloat16 where the hardware computes it natively, :func:`agentloop.config.resolve_dtype`)."""
    seed: int = 0
    """Seed for LoRA initialisation and data order."""
    replay_fraction: float = 0.0
    """For SFT rounds after the first (STE): the share of earlier rounds' SFT data (expert
    demonstrations included) the loop mixes in, per env (``data.mix_replay_per_env``); 0 = none."""
    keep_memory: bool = False
    """Train on the memory an episode was shown (STE's trials) as part of its prompt; by default
    it is stripped, as STE fine-tunes on task to solution without the trial history."""

    def validate(self) -> None:
        """Raises ``ConfigError`` on an out-of-range field."""
        common.check_training_fields(self)
        common.check_lora_fields(self)
        if not 0 <= self.replay_fraction <= 1:
            raise ConfigError(f"replay_fraction: must be in [0, 1], got {self.replay_fraction}")


def build_sft_trainer(
    base_model: Path,
    trajectories: Sequence[Trajectory],
    config: SFTLearnerConfig,
    work_dir: Path,
    adapter: Path | None = None,
) -> tuple[SFTTrainer, dict[str, float]]:
    """The configured trainer, the training-set sizes and ``timing/sft_setup`` (building the trainer)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from agentloop.learners.trainers import AssistantLogitsSFTTrainer
    from agentloop.policy.chat import ChatTokenizer

    tokenizer = common.load_tokenizer(base_model)
    examples, report = sft_examples(trajectories, ChatTokenizer(tokenizer), config.max_length, config.keep_memory)
    if not examples:
        raise ValueError("no SFT example left: every trajectory was empty or had no assistant turn within max_length")
    if adapter is None:
        model, peft_config = common.load_base(base_model, config.dtype), common.lora_config(config)
    else:
        model, peft_config = common.load_policy(base_model, adapter, config.dtype), None
    args = SFTConfig(
        **common.training_arguments(config, work_dir),
        max_length=None,  # sft_examples already cut each conversation at a turn boundary
        padding_free=config.padding_free,
    )
    trainer_class = AssistantLogitsSFTTrainer if config.logits_on_assistant_only else SFTTrainer
    start = time.perf_counter()
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    common.quiet(trainer)
    sizes = {
        "sft/examples": float(len(examples)),
        "sft/train_tokens": float(sum(len(e["input_ids"]) for e in examples)),
        "sft/assistant_tokens": float(sum(sum(e["assistant_masks"]) for e in examples)),
        **report.metrics("sft", "examples"),
        "timing/sft_setup": time.perf_counter() - start,
    }
    return trainer, sizes


def train_sft(
    base_model: Path,
    trajectories: Sequence[Trajectory],
    config: SFTLearnerConfig,
    output_dir: Path,
    adapter: Path | None = None,
) -> dict[str, float]:
    """Trains the LoRA adapter by SFT on the trajectories' assistant turns and saves it.

    Args:
        base_model: The fixed base checkpoint directory.
        trajectories: Conversations to imitate; expert ones may come without tokens.
        config: Training settings.
        output_dir: Where the adapter is saved (``save_pretrained`` layout).
        adapter: An adapter to continue training; ``None`` creates a new one on the base.

    Returns:
        ``sft/loss`` (mean over steps), ``sft/loss_first``, ``sft/loss_last``, ``sft/steps``,
        ``sft/examples``, ``sft/train_tokens`` and ``sft/assistant_tokens`` (one epoch),
        ``sft/tokens_per_s`` (tokens fed per second of building the trainer and training),
        ``timing/sft_setup``, ``timing/sft_train`` (setup included) and ``timing/sft`` (the
        whole call, loading and saving included).
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agentloop-sft-") as work_dir:
        trainer, metrics = build_sft_trainer(base_model, trajectories, config, Path(work_dir), adapter)
        metrics |= common.run_training(trainer, "sft", int(metrics["sft/train_tokens"]), metrics["timing/sft_setup"])
        common.save_adapter(trainer.model, Path(output_dir))
    metrics["timing/sft"] = time.perf_counter() - start
    logger.info("SFT done: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics
