"""The transformers backend: batched generation on CPU or GPU, LoRA adapters through PEFT.

Adapters are merged into a copy of the base weights when loaded, so generation runs at the
base model's speed; the pristine base weights stay in memory to merge the next adapter on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from agentloop.policy.base import Generation, PolicyConfig, SamplingConfig
from agentloop.policy.chat import ChatTokenizer
from agentloop.policy.model import resolve_model

logger = logging.getLogger(__name__)


class HFPolicy:
    """A causal LM from transformers that completes token prompts in batches."""

    def __init__(self, config: PolicyConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        path = resolve_model(config.model)
        tokenizer = AutoTokenizer.from_pretrained(path)
        self.chat = ChatTokenizer(tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, config.dtype)).to(self.device)
        self.model.eval()
        self._base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.version = 0
        self.adapter: Path | None = None

    def load_adapter(self, adapter: Path | None, version: int) -> None:
        """Acts with base + ``adapter`` (a PEFT LoRA directory) from now on; None = base model."""
        from peft import PeftModel

        self.model.load_state_dict(self._base_state)
        if adapter is not None:
            merged = PeftModel.from_pretrained(self.model, str(adapter)).merge_and_unload()
            self.model = merged.eval()
        self.adapter, self.version = adapter, version
        logger.info("policy v%d: %s", version, adapter or "base model")

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        """Completes each prompt; prompts are grouped by length to waste little padding."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[Generation | None] = [None] * len(prompts)
        size = self.config.batch_size
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            for i, gen in zip(chunk, self._generate_batch([prompts[i] for i in chunk], sampling), strict=True):
                out[i] = gen
        return [g for g in out if g is not None]

    def _generate_batch(self, prompts: list[Sequence[int]], sampling: SamplingConfig) -> list[Generation]:
        import torch

        pad = self.chat.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        torch.manual_seed(sampling.seed)
        greedy = sampling.temperature == 0
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None,
                eos_token_id=list(self.chat.stop_ids),
                pad_token_id=pad,
            )
        return [self._completion(row[width:].tolist()) for row in output.cpu()]

    def _completion(self, new_ids: list[int]) -> Generation:
        stops = self.chat.stop_ids
        end = next((i for i, t in enumerate(new_ids) if t in stops), None)
        ids = new_ids if end is None else new_ids[: end + 1]
        return Generation(token_ids=tuple(ids), text=self.chat.decode_completion(ids), finished=end is not None)
