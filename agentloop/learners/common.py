"""What the SFT and DPO learners share: loading the policy, TRL's common arguments, saving, timing.

The policy is a fixed base checkpoint plus one PEFT LoRA adapter directory. Heavy imports
(torch, transformers, peft) happen inside the functions, so importing the learners is cheap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentloop.config import DTYPES, ConfigError, resolve_dtype

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

logger = logging.getLogger(__name__)

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def check_training_fields(config: Any) -> None:
    """Range checks for the fields both learner configs have.

    Raises:
        ConfigError: Naming the first offending field.
    """
    for name in ("epochs", "batch_size", "grad_accumulation"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(config, name)}")
    if config.max_length < 0:
        raise ConfigError(
            f"max_length: must be at least 1 (or 0: an experiment fits it to its envs), got {config.max_length}"
        )
    if not config.learning_rate > 0:
        raise ConfigError(f"learning_rate: must be positive, got {config.learning_rate}")
    if not 0 <= config.warmup_ratio < 1:
        raise ConfigError(f"warmup_ratio: must be in [0, 1), got {config.warmup_ratio}")
    if config.scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler: {config.scheduler!r} is not one of {list(SCHEDULERS)}")
    if config.dtype not in DTYPES:
        raise ConfigError(f"dtype: {config.dtype!r} is not one of {list(DTYPES)}")


def check_lora_fields(config: Any) -> None:
    """Range checks for the ``lora_*`` fields of a config that creates an adapter.

    Raises:
        ConfigError: Naming the first offending field.
    """
    for name in ("lora_r", "lora_alpha"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(config, name)}")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"lora_dropout: must be in [0, 1), got {config.lora_dropout}")
    if not config.lora_target_modules:
        raise ConfigError("lora_target_modules: must name at least one module (or 'all-linear')")


def load_tokenizer(base_model: Path) -> PreTrainedTokenizerBase:
    """The base checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_model))


def load_base(base_model: Path, dtype: str) -> PreTrainedModel:
    """The base checkpoint in ``dtype`` (``"bfloat16"``, ``"float32"``, or ``"auto"``: :func:`resolve_dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = resolve_dtype(dtype)  # auto: on the learner's own hardware, which the log records
    logger.info("learner's base %s in %s (dtype=%s)", base_model, resolved, dtype)
    return AutoModelForCausalLM.from_pretrained(str(base_model), dtype=getattr(torch, resolved))


def load_policy(base_model: Path, adapter: Path, dtype: str) -> PeftModel:
    """Base checkpoint plus the adapter at ``adapter``, trainable, under the adapter name ``default``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_model, dtype), str(adapter), is_trainable=True)


def lora_config(config: Any) -> LoraConfig:
    """A PEFT ``LoraConfig`` from a learner config's ``lora_*`` fields (the LM head is never adapted)."""
    from peft import LoraConfig

    modules: Sequence[str] = config.lora_target_modules
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if tuple(modules) == ("all-linear",) else list(modules),
        task_type="CAUSAL_LM",
    )


def training_arguments(config: Any, output_dir: Path) -> dict[str, Any]:
    """Keyword arguments for TRL's ``SFTConfig`` / ``DPOConfig`` common to both learners.

    On a machine without CUDA, ``use_cpu=True``; ``bf16`` follows ``config.dtype``, resolved here (TRL
    defaults it to True, which fails on CPU without ``use_cpu``). Nothing is checkpointed or
    reported: the learner saves the adapter itself, once, at the end.
    """
    import torch

    return {
        "output_dir": str(output_dir),
        "num_train_epochs": config.epochs,
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.batch_size,
        "gradient_accumulation_steps": config.grad_accumulation,
        "warmup_steps": config.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        "lr_scheduler_type": config.scheduler,
        "gradient_checkpointing": config.gradient_checkpointing,
        "bf16": resolve_dtype(config.dtype) == "bfloat16",
        "use_cpu": not torch.cuda.is_available(),
        "seed": config.seed,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 1,
        "disable_tqdm": True,
    }


def save_adapter(model: PeftModel, output_dir: Path) -> Path:
    """Saves only the trained ``default`` adapter (no tokenizer, no embeddings) to ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), selected_adapters=["default"], save_embedding_layers=False)
    logger.info("saved adapter to %s", output_dir)
    return output_dir


def quiet(trainer: Trainer) -> Trainer:
    """Routes the trainer's step logs to ``logging`` instead of stdout."""
    from transformers import PrinterCallback

    from agentloop.learners.trainers import LogCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(LogCallback())
    return trainer


def run_training(
    trainer: Trainer,
    prefix: str,
    tokens_per_epoch: int,
    setup_seconds: float = 0.0,
    mean_keys: Sequence[str] = (),
) -> dict[str, float]:
    """Trains and returns the run's metrics under ``prefix``.

    Args:
        trainer: A configured trainer.
        prefix: Metric namespace, ``sft`` or ``dpo``.
        tokens_per_epoch: Tokens the trainer feeds per epoch (padding excluded).
        setup_seconds: Time spent building the trainer that belongs to training (e.g. a
            precomputation of reference log-probs); it counts in ``tokens_per_s``.
        mean_keys: Logged trainer metrics to report as means over the steps, e.g.
            ``rewards/margins``.

    Returns:
        ``<prefix>/loss`` (mean over steps), ``loss_first``, ``loss_last``, ``steps``,
        ``tokens_per_s`` and the means of ``mean_keys``, plus ``timing/<prefix>_train``.
    """
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    epochs = float(trainer.state.epoch or 0.0)
    metrics = {
        f"{prefix}/loss": float(output.training_loss),
        f"{prefix}/loss_first": float(losses[0]) if losses else float("nan"),
        f"{prefix}/loss_last": float(losses[-1]) if losses else float("nan"),
        f"{prefix}/steps": float(output.global_step),
        f"{prefix}/tokens_per_s": tokens_per_epoch * epochs / (seconds + setup_seconds),
        f"timing/{prefix}_train": seconds + setup_seconds,
    }
    for key in mean_keys:
        values = [float(entry[key]) for entry in history if key in entry]
        metrics[f"{prefix}/{key}"] = sum(values) / len(values) if values else float("nan")
    return metrics
