"""The transformers backend: batched generation on CPU or GPU, LoRA adapters through PEFT.

Adapters are merged into a copy of the base weights when loaded, so generation runs at the
base model's speed; the pristine base weights stay in memory to merge the next adapter on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agentloop.policy.base import Generation, PolicyConfig, SamplingConfig
from agentloop.policy.chat import ChatTokenizer
from agentloop.policy.model import resolve_model

if TYPE_CHECKING:
    import torch

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
        """Left-padded prefill, then one token per step for the rows still going.

        A row leaves the batch (and its KV cache rows are dropped) as soon as it emits a stop
        token, so a batch costs what its rows generate, not ``rows x longest row`` as with
        ``model.generate``; only the last position's logits are ever computed.
        """
        import torch
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        pad = self.chat.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the same column
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
            mask[row, width - len(prompt) :] = 1
        greedy = sampling.temperature == 0
        warpers = LogitsProcessorList(
            [] if greedy else [TemperatureLogitsWarper(sampling.temperature), TopPLogitsWarper(sampling.top_p)]
        )
        generator = torch.Generator().manual_seed(sampling.seed)
        stops = torch.tensor(sorted(self.chat.stop_ids))
        outputs: list[list[int]] = [[] for _ in prompts]
        rows = torch.arange(len(prompts))  # prompt index of each row still in the batch
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = None
        decoder = self.model.get_decoder()
        with torch.inference_mode():
            for _ in range(sampling.max_new_tokens):
                out = decoder(
                    input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
                )
                cache, logits = out.past_key_values, self._logits(out.last_hidden_state[:, -1])
                if greedy:
                    tokens = logits.argmax(-1)
                else:
                    probs = warpers(None, logits).softmax(-1)
                    tokens = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(self.device)
                for row, token in zip(rows.tolist(), tokens.tolist(), strict=True):
                    outputs[row].append(token)
                going = ~torch.isin(tokens.cpu(), stops)
                if not going.any():
                    break
                if not going.all():  # drop finished rows from the batch and the cache
                    keep = going.nonzero().squeeze(1)
                    rows, tokens = rows[keep], tokens[keep.to(self.device)]
                    mask, positions = mask[keep.to(self.device)], positions[keep.to(self.device)]
                    cache.batch_select_indices(keep.to(self.device))
                ids = tokens.unsqueeze(1)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
        return [self._completion(row) for row in outputs]

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (fp32) from last-position hidden states ``[rows, hidden]``.

        The output layer is applied here to a 2-D input rather than through the model's
        ``logits_to_keep``: on torch 2.13 CPU, ``F.linear`` on the strided 3-D slice that
        produces, with a weight that does not require grad (as after a LoRA merge), expands
        the 262k x 640 weight once per row (a 10 GB copy, 40 s per prefill of 32 prompts).
        """
        import torch

        logits = self.model.get_output_embeddings()(hidden.contiguous()).float()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / softcap) * softcap if softcap else logits

    def _completion(self, new_ids: list[int]) -> Generation:
        stops = self.chat.stop_ids
        end = next((i for i, t in enumerate(new_ids) if t in stops), None)
        ids = new_ids if end is None else new_ids[: end + 1]
        return Generation(token_ids=tuple(ids), text=self.chat.decode_completion(ids), finished=end is not None)
