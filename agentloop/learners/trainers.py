"""Thin, one-level subclasses of TRL's trainers for multi-turn agent trajectories.

The losses are TRL's and transformers'. What changes: which positions reach the 262k-word
output layer (only those the loss reads, on CPU too), and how pre-tokenized, turn-masked
preference data enters the DPO trainer. This module imports torch and TRL at import time:
import it inside the functions that train.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel, TrainerCallback
from trl import DPOTrainer, SFTTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import FusedCausalLMOutput, entropy_from_logits, pad, selective_log_softmax

logger = logging.getLogger(__name__)


class LogCallback(TrainerCallback):
    """Sends the trainer's step logs to ``logging`` (in place of transformers' printing callback)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Logs one line per logging step."""
        logger.info("step %d: %s", state.global_step, logs)


class AssistantLogitsSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss runs the output layer only on the positions that are trained.

    A position is kept when its next-token label is not -100 in some row of the batch. The
    model receives those positions as ``logits_to_keep`` (transformers slices the hidden
    states before the LM head), and the model's own causal-LM loss function scores the
    logits against the matching, already shifted labels, normalised like TRL's loss (by
    ``num_items_in_batch``, the label count of the whole accumulated batch). On CPU TRL's
    fused head scores every position; with a 262k vocabulary this is most of a step.
    Evaluation and ``return_outputs`` use TRL's own path.
    """

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """The mean token cross-entropy over the trained positions of ``inputs``."""
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        shift_labels = inputs["labels"][:, 1:]
        keep = (shift_labels != -100).any(dim=0).nonzero().squeeze(-1)
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
        loss = self.accelerator.unwrap_model(model).loss_function(
            outputs.logits,
            None,
            outputs.logits.size(-1),
            num_items_in_batch=num_items_in_batch,
            shift_labels=shift_labels[:, keep].contiguous(),
        )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._count_tokens(inputs)
        return loss

    def _count_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
        """Keeps TRL's ``num_tokens`` metric (tokens fed, padding excluded)."""
        mask = inputs.get("attention_mask")
        self._total_train_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        self._metrics["train"]["num_tokens"] = [self._total_train_tokens]


class TurnMaskedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, with the completion mask set from per-token assistant masks.

    Examples carry ``chosen_mask`` / ``rejected_mask`` (1 on assistant tokens of the
    completion). TRL scores exactly the completion-mask positions, so environment turns
    inside a multi-turn completion drop out of the log-probabilities.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Pads like the parent, then replaces ``completion_mask`` with the turn-level mask."""
        output = super().torch_call(examples)
        masks = [[0] * len(e["prompt_ids"]) + e[f"{side}_mask"] for side in ("chosen", "rejected") for e in examples]
        if self.max_length is not None:  # truncate like the parent does
            keep = (
                slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            )
            masks = [m[keep] for m in masks]
        completion_mask = pad(
            [torch.tensor(m, dtype=torch.long) for m in masks],
            padding_value=0,
            padding_side="right",
            pad_to_multiple_of=self.pad_to_multiple_of,
        )
        output["completion_mask"] = completion_mask
        return output


def add_compact_lm_head(model: PreTrainedModel) -> None:
    """Makes TRL's fused LM head project only the positions that carry a label, on any device.

    TRL's ``add_fused_lm_head`` contract: ``model(..., labels=labels, fused_lm_head=True)``
    returns a ``FusedCausalLMOutput`` of per-token log-probabilities (zero where the label is
    -100) instead of logits. TRL 1.16 scores only labelled positions on Triton devices and
    every position elsewhere, which on CPU makes the 262k-word output layer most of a DPO
    step. This replacement selects the labelled positions' hidden states, runs the model's
    own ``lm_head`` (and final soft-capping) on them, and takes the log-probabilities with
    TRL's ``selective_log_softmax`` (entropy, mean logit and top-1 only feed metrics).
    Calls without ``fused_lm_head`` go to the previous forward. Call it on the base model
    after TRL has added its fused head.

    Raises:
        ValueError: If the model scales its logits in a way this head does not reproduce.
    """
    config = model.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in ("logit_scale", "output_multiplier", "logits_scaling")):
        raise ValueError(f"{type(model).__name__} scales its logits; the compact LM head supports soft-capping only")
    softcap = getattr(config, "final_logit_softcapping", None)
    previous_forward = model.forward

    def forward(self: PreTrainedModel, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any):
        if not fused_lm_head:
            return previous_forward(*args, labels=labels, **kwargs)
        hidden = self.base_model(*args, **{**kwargs, "use_cache": False}).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        logits = self.get_output_embeddings()(hidden[mask])
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        logits = logits.float()
        log_probs = selective_log_softmax(logits, targets[mask])
        with torch.no_grad():
            entropy, mean_logits = entropy_from_logits(logits), logits.mean(-1)
            is_top1 = logits.argmax(-1) == targets[mask]
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / mask.sum().clamp(min=1),
            log_probs=log_probs.new_zeros(mask.shape).masked_scatter(mask, log_probs),
            entropy=entropy.new_zeros(mask.shape).masked_scatter(mask, entropy),
            mean_logits=mean_logits.new_zeros(mask.shape).masked_scatter(mask, mean_logits),
            is_top1=is_top1.new_zeros(mask.shape).masked_scatter(mask, is_top1),
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


class PretokenizedDPOTrainer(DPOTrainer):
    """DPOTrainer that takes already tokenized examples as they are, optionally with a compact LM head.

    TRL 1.16 always re-tokenizes text prompts and completions; agent trajectories are
    trained on the exact tokens the policy saw and produced, so a dataset that already has
    ``prompt_ids`` skips that step. Pass :class:`TurnMaskedPreferenceCollator` and
    ``remove_unused_columns=False`` so the mask columns reach the collator. With
    ``compact_lm_head=True`` the policy's and the reference's log-probabilities (the
    precomputed ones included) come from :func:`add_compact_lm_head`; the loss is TRL's.
    """

    def __init__(self, *args: Any, compact_lm_head: bool = False, **kwargs: Any) -> None:
        self._compact_lm_head = compact_lm_head
        super().__init__(*args, **kwargs)
        self._install_compact_lm_head()

    def _install_compact_lm_head(self) -> None:
        """Installs the compact head once, after TRL's fused head (TRL adds it late in ``__init__``)."""
        base = self.model.get_base_model()
        if self._compact_lm_head and not getattr(base, "_compact_lm_head", False):
            add_compact_lm_head(base)
            base._compact_lm_head = True

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        self._install_compact_lm_head()  # TRL precomputes at the end of __init__
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str) -> Dataset:
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
