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
from trl.trainer.utils import FusedCausalLMOutput, pad

logger = logging.getLogger(__name__)


class LogCallback(TrainerCallback):
    """Sends the trainer's step logs to ``logging`` (in place of transformers' printing callback)."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        """Logs one line per logging step."""
        logger.info("step %d: %s", state.global_step, logs)


class AssistantLogitsSFTTrainer(SFTTrainer):
    """SFTTrainer whose training loss runs the output layer only on the positions that are trained.

    The model's forward pass gets the compact head of :func:`add_compact_lm_head`: only the
    positions whose next-token label is not -100 reach the output layer, a block at a time,
    and the loss is their summed negative log-likelihood normalised like TRL's (by
    ``num_items_in_batch``, the label count of the whole accumulated batch). On CPU TRL
    scores every position; with a 262k vocabulary this is most of a step, and holding all
    the logits at once most of its memory. Evaluation and ``return_outputs`` use TRL's path.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_compact_lm_head(base)

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
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        count = num_items_in_batch if num_items_in_batch is not None else outputs.label_mask.sum()
        loss = -outputs.log_probs.sum() / count
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


LM_HEAD_CHUNK = 128
"""Positions per block of the compact head: a block's fp32 logits over 262k words take 128 MB."""


class ChunkedTokenLogProbs(torch.autograd.Function):
    """Log-probability of each target token under ``softcap(hidden @ weight.T)``, a block of rows at a time.

    Plain autograd keeps the fp32 logits of every scored position for the backward pass, and
    their softmax and gradient beside them: with a 262k vocabulary, 1 GB per 1,000 positions
    and copy, which made the logits most of a DPO step's memory. Here the forward pass keeps
    only ``hidden``; the backward pass recomputes each block's logits (one more matmul) and
    turns the incoming gradient into gradients of ``hidden`` and, if it trains, of ``weight``.
    The forward pass also returns, without gradient, what TRL's fused head reports: each
    position's entropy, mean logit and whether the target is the top-1 word; with
    ``stats=False`` (reference log-probs, which need none of them) those are NaN and False,
    and the exponentials over the vocabulary they need are skipped.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk, stats=True):
        n = hidden.shape[0]
        log_probs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy, mean_logits = torch.empty_like(log_probs), torch.empty_like(log_probs)
        is_top1 = torch.zeros(n, dtype=torch.bool, device=hidden.device)
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logits = _capped(torch.nn.functional.linear(hidden[rows], weight).float(), softcap)
            log_norm = logits.logsumexp(-1)
            log_probs[rows] = logits.gather(1, targets[rows, None]).squeeze(1) - log_norm
            if not stats:
                continue
            probs = (logits - log_norm[:, None]).exp_()
            entropy[rows] = log_norm - (probs * logits).sum(-1)
            mean_logits[rows] = logits.mean(-1)
            is_top1[rows] = logits.argmax(-1) == targets[rows]
        ctx.save_for_backward(hidden, weight, targets)
        ctx.softcap, ctx.chunk = softcap, chunk
        if not stats:
            entropy.fill_(float("nan"))
            mean_logits.fill_(float("nan"))
        ctx.mark_non_differentiable(entropy, mean_logits, is_top1)
        return log_probs, entropy, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *unused):
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            raw = torch.nn.functional.linear(hidden[rows], weight).float()
            logits = _capped(raw, ctx.softcap)
            # d log p[target] / d logits = onehot(target) - softmax(logits)
            grad = logits.softmax(-1).mul_(-grad_log_probs[rows, None])
            grad.scatter_add_(1, targets[rows, None], grad_log_probs[rows, None])
            if ctx.softcap is not None:  # d softcap * tanh(raw / softcap) / d raw = 1 - tanh^2
                grad.mul_(1 - (logits / ctx.softcap).square())
            grad = grad.to(weight.dtype)
            if need_hidden:
                grad_hidden[rows] = grad @ weight
            if need_weight:
                grad_weight += grad.t().float() @ hidden[rows].float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def add_compact_lm_head(model: PreTrainedModel, chunk: int = LM_HEAD_CHUNK) -> None:
    """Makes TRL's fused LM head project only the positions that carry a label, on any device.

    TRL's ``add_fused_lm_head`` contract: ``model(..., labels=labels, fused_lm_head=True)``
    returns a ``FusedCausalLMOutput`` of per-token log-probabilities (zero where the label is
    -100) instead of logits. TRL 1.16 scores only labelled positions on Triton devices and
    every position elsewhere, which on CPU makes the 262k-word output layer most of a DPO
    step. This replacement selects the labelled positions' hidden states and scores them
    with the model's own ``lm_head`` weight (and final soft-capping) ``chunk`` positions at a
    time (:class:`ChunkedTokenLogProbs`), so neither the full logits nor their gradient are
    ever held at once. Calls without ``fused_lm_head`` go to the previous forward. Call it on
    the base model after TRL has added its fused head. Setting the model's
    ``compact_lm_head_stats`` to False skips the entropy, mean logit and top-1 statistics
    (see :class:`ChunkedTokenLogProbs`).

    Raises:
        ValueError: If the model scales its logits in a way this head does not reproduce, or
            its output layer has a bias.
    """
    config = model.config.get_text_config()
    if any(getattr(config, name, None) is not None for name in ("logit_scale", "output_multiplier", "logits_scaling")):
        raise ValueError(f"{type(model).__name__} scales its logits; the compact LM head supports soft-capping only")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}'s output layer has a bias; the compact LM head has none")
    softcap = getattr(config, "final_logit_softcapping", None)
    previous_forward = model.forward

    def forward(self: PreTrainedModel, *args: Any, fused_lm_head: bool = False, labels: Any = None, **kwargs: Any):
        if not fused_lm_head:
            return previous_forward(*args, labels=labels, **kwargs)
        hidden = self.base_model(*args, **{**kwargs, "use_cache": False}).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        weight = self.get_output_embeddings().weight
        scored = hidden[mask].to(weight.dtype)
        log_probs, entropy, mean_logits, is_top1 = ChunkedTokenLogProbs.apply(
            scored, weight, targets[mask], softcap, chunk, getattr(self, "compact_lm_head_stats", True)
        )
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
        base = self.model.get_base_model()
        base.compact_lm_head_stats = False  # TRL reads only the reference's log-probs
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            base.compact_lm_head_stats = True

    def _prepare_dataset(self, dataset: Dataset, processing_class: Any, args: Any, dataset_name: str) -> Dataset:
        if "prompt_ids" in dataset.column_names:
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
