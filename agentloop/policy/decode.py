"""Batched decoding for transformers causal LMs, with a prefix cache across turns.

Two costs dominate multi-turn generation with ``model.generate`` on a CPU: every row of a
batch runs until the longest one stops, and every turn prefills the whole conversation
again. :func:`decode` removes both:

- A row leaves the batch (and its cache rows) as soon as it emits a stop token.
- The keys and values of a finished turn are kept in a :class:`PrefixCache`. The next turn
  of the same conversation starts with those tokens, so only its new tokens (the end of the
  last reply and the new observation) go through the model.

Rows resume from caches of different lengths, so a batch is laid out as
``[padding, cached tokens, padding, new tokens]`` per row and the attention masks are built
here from each key's true position, not its column: causal, the sliding window of local
layers (Gemma 3 alternates local and global layers), and no attention to padding. The
result equals decoding each prompt alone from scratch (tests check it against
``model.generate``), up to floating-point rounding.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class CachedPrefix:
    """The keys and values of one token sequence, per layer ``[1, kv_heads, len(ids), head_dim]``."""

    ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]


class PrefixCache:
    """Finished turns' keys and values, looked up by the prompt that continues them.

    An entry serves one continuation (it is removed when used; the continuation stores a
    longer one). When more than ``max_tokens`` are held, the oldest entries go first.
    """

    _TAIL = 16  # tokens hashed with the length to find candidate entries quickly

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, int], CachedPrefix] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        """Prompts that resumed from an entry."""
        self.reused_tokens = 0
        """Prompt tokens those prompts did not prefill."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return self._tokens

    def put(self, entry: CachedPrefix) -> None:
        if not entry.ids or len(entry.ids) > self.max_tokens:
            return
        key = self._key(entry.ids, len(entry.ids))
        if key in self._entries:
            self._tokens -= len(self._entries.pop(key).ids)
        self._entries[key] = entry
        self._tokens += len(entry.ids)
        while self._tokens > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self._tokens -= len(old.ids)

    def pop(self, prompt: Sequence[int], *, reuse: bool = True) -> CachedPrefix | None:
        """Removes and returns the longest entry that is a strict prefix of ``prompt``.

        ``reuse=False`` only drops it (a finished conversation), without counting a hit.
        """
        lengths = sorted({n for n, _ in self._entries if n < len(prompt)}, reverse=True)
        for n in lengths:
            key = self._key(prompt, n)
            entry = self._entries.get(key)
            if entry is not None and tuple(prompt[:n]) == entry.ids:
                del self._entries[key]
                self._tokens -= n
                self.hits += reuse
                self.reused_tokens += n * reuse
                return entry
        return None

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0

    @classmethod
    def _key(cls, ids: Sequence[int], n: int) -> tuple[int, int]:
        return n, hash(tuple(ids[max(0, n - cls._TAIL) : n]))


class KVBuffer:
    """The keys and values of a running batch, per layer ``[rows, kv_heads, columns, head_dim]``.

    Each layer's tensors have spare columns, so a decode step writes its column in place;
    transformers' ``DynamicCache`` concatenates, copying the whole cache at every step. The
    model's attention layers call :meth:`update`, the only method they need.
    """

    def __init__(self, keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None) -> None:
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[int] = []
        for k, v in zip(keys or [], values or [], strict=True):
            self._append_layer(k, v)

    def __len__(self) -> int:
        return len(self._keys)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's filled columns."""
        n = self._lengths[index]
        return self._keys[index][:, :, :n], self._values[index][:, :, :n]

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        if layer_idx == len(self._keys):
            self._append_layer(key_states, value_states)
            return self.layer(layer_idx)
        n, q = self._lengths[layer_idx], key_states.shape[2]
        if n + q > self._keys[layer_idx].shape[2]:
            self._keys[layer_idx] = _grow(self._keys[layer_idx], n, n + q)
            self._values[layer_idx] = _grow(self._values[layer_idx], n, n + q)
        self._keys[layer_idx][:, :, n : n + q] = key_states
        self._values[layer_idx][:, :, n : n + q] = value_states
        self._lengths[layer_idx] = n + q
        return self.layer(layer_idx)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only ``rows`` (a 1-D index tensor)."""
        self._keys = [k[rows] for k in self._keys]
        self._values = [v[rows] for v in self._values]

    def _append_layer(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        n = keys.shape[2]
        self._keys.append(_grow(keys, n, n))
        self._values.append(_grow(values, n, n))
        self._lengths.append(n)


def _grow(t: torch.Tensor, filled: int, needed: int) -> torch.Tensor:
    """A copy of ``t``'s first ``filled`` columns in a tensor with room for ``needed`` plus spare."""
    import torch

    capacity = needed + max(64, needed // 4)
    out = torch.empty(t.shape[0], t.shape[1], capacity, t.shape[3], dtype=t.dtype, device=t.device)
    out[:, :, :filled] = t[:, :, :filled]
    return out


class DecodeEngine:
    """Continuous batching: requests join and leave a running batch one token step at a time.

    ``add`` queues a prompt; each ``step`` either admits queued prompts (one prefill forward
    for them, resumed from the prefix cache where possible, then merged into the batch) or
    advances every running row by one token, and returns the requests that finished. A
    finished request's keys and values go to the prefix cache, so when its conversation
    comes back with one more turn only the new tokens are prefilled.

    Batch layout: ``key_pos[row, column]`` is the position of the token whose keys and values
    sit in that cache column, or -1 for an empty column (padding, or columns a row that joined
    later never used). Attention masks are built from these positions.
    """

    def __init__(
        self,
        model,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        pick: Callable[[torch.Tensor], torch.Tensor],
        max_rows: int,
        cache: PrefixCache | None = None,
    ) -> None:
        import torch

        self.model, self.max_new_tokens, self.pad_id, self.pick = model, max_new_tokens, pad_id, pick
        self.max_rows, self.cache = max_rows, cache
        self.device = next(model.parameters()).device
        self.stops = torch.tensor(sorted(set(stop_ids)), device=self.device)
        self.window = _sliding_window(model.config)
        self.waiting: deque[tuple[Hashable, tuple[int, ...]]] = deque()
        self.rows: list[Hashable] = []  # request of each running row
        self.prompts: dict[Hashable, tuple[int, ...]] = {}
        self.outputs: dict[Hashable, list[int]] = {}
        self.kv: KVBuffer | None = None  # keys and values of the running rows
        self.key_pos: torch.Tensor | None = None
        self.next_tokens: torch.Tensor | None = None  # each running row's last sampled token, not yet fed

    def add(self, key: Hashable, prompt: Sequence[int]) -> None:
        if key in self.prompts:
            raise ValueError(f"request {key!r} is already running")
        if not prompt:
            raise ValueError(f"request {key!r} has an empty prompt")
        self.prompts[key] = tuple(prompt)
        self.waiting.append((key, tuple(prompt)))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def step(self) -> list[tuple[Hashable, list[int]]]:
        """One forward pass; returns ``(key, generated ids)`` of the requests that ended."""
        if self.waiting and self._admit_now():
            return self._admit()
        if self.rows:
            return self._decode()
        return []

    def _admit_now(self) -> bool:
        free = self.max_rows - len(self.rows)
        # Prefill in groups: a lone prompt waits while the batch is still mostly full.
        return free > 0 and (len(self.rows) <= self.max_rows // 2 or len(self.waiting) >= max(1, free // 2))

    def _admit(self) -> list[tuple[Hashable, list[int]]]:
        import torch

        free = self.max_rows - len(self.rows)
        group = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        found = [self.cache.pop(p) if self.cache is not None else None for _, p in group]
        cached = [len(f.ids) if f else 0 for f in found]
        new = [p[c:] for (_, p), c in zip(group, cached, strict=True)]
        width_cached, width_new = max(cached), max(len(n) for n in new)

        kv = _fill_cache(found, width_cached, self.device) if width_cached else KVBuffer()
        key_pos = torch.full((len(group), width_cached + width_new), -1, dtype=torch.long)
        input_ids = torch.full((len(group), width_new), self.pad_id, dtype=torch.long)
        for r, (c, tokens) in enumerate(zip(cached, new, strict=True)):
            key_pos[r, width_cached - c : width_cached] = torch.arange(c)
            input_ids[r, width_new - len(tokens) :] = torch.tensor(tokens)
            key_pos[r, width_cached + width_new - len(tokens) :] = torch.arange(c, c + len(tokens))
        key_pos = key_pos.to(self.device)
        tokens = self._forward(input_ids.to(self.device), key_pos[:, width_cached:], key_pos, kv)
        keys = [key for key, _ in group]
        for key in keys:
            self.outputs[key] = []
        return self._advance(keys, tokens, kv, key_pos, joining=True)

    def _decode(self) -> list[tuple[Hashable, list[int]]]:
        import torch

        query_pos = self.key_pos.max(dim=1, keepdim=True).values + 1
        key_pos = torch.cat([self.key_pos, query_pos], dim=1)
        tokens = self._forward(self.next_tokens.unsqueeze(1), query_pos, key_pos, self.kv)
        return self._advance(self.rows, tokens, self.kv, key_pos, joining=False)

    def _forward(self, input_ids, query_pos, key_pos, kv) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            out = self.model.get_decoder()(
                input_ids=input_ids,
                attention_mask=_masks(self.model.config, query_pos, key_pos, self.window),
                position_ids=query_pos.clamp(min=0),
                past_key_values=kv,
                use_cache=True,
            )
            # The output layer runs here, on a 2-D input, rather than through the model's
            # ``logits_to_keep``: torch 2.13's F.linear on CPU, given the strided 3-D slice that
            # produces and a weight that does not require grad (as after a LoRA merge), expands
            # the 262k x 640 weight once per row (a 10 GB copy, 40 s per prefill of 32 prompts).
            logits = self.model.get_output_embeddings()(out.last_hidden_state[:, -1].contiguous()).float()
            softcap = getattr(self.model.config, "final_logit_softcapping", None)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            return self.pick(logits)

    def _advance(self, keys, tokens, kv, key_pos, *, joining: bool) -> list[tuple[Hashable, list[int]]]:
        """Records each row's new token; rows that ended leave the batch (into the prefix cache)."""
        import torch

        for key, token in zip(keys, tokens.tolist(), strict=True):
            self.outputs[key].append(token)
        going = ~torch.isin(tokens, self.stops)
        going &= torch.tensor([len(self.outputs[k]) < self.max_new_tokens for k in keys], device=self.device)
        finished = []
        for row in (~going).nonzero().squeeze(1).tolist():
            key = keys[row]
            prompt, generated = self.prompts.pop(key), self.outputs.pop(key)
            if self.cache is not None:
                self.cache.put(_extract(kv, row, key_pos[row], prompt + tuple(generated[:-1])))
            finished.append((key, generated))
        keep = going.nonzero().squeeze(1)
        if len(keep) < len(keys):
            kv.select(keep)
            key_pos, tokens = key_pos[keep], tokens[keep]
            keys = [keys[i] for i in keep.tolist()]
        if joining and self.rows:
            kv, key_pos = _merge(self.kv, self.key_pos, kv, key_pos)
            keys, tokens = self.rows + keys, torch.cat([self.next_tokens, tokens])
        self.rows, self.kv, self.key_pos, self.next_tokens = keys, kv, key_pos, tokens
        if not self.rows:
            self.kv = self.key_pos = self.next_tokens = None
        elif self._sparse():
            self.kv, self.key_pos = _compact(self.kv, self.key_pos)
        return finished

    def _sparse(self) -> bool:
        """True when empty columns make up most of the cache (rows that joined late, or left)."""
        used = int((self.key_pos >= 0).sum(dim=1).max())
        return self.key_pos.shape[1] > 2 * used + 64


def _fill_cache(found: list[CachedPrefix | None], width: int, device) -> KVBuffer:
    """A buffer holding each row's cached keys and values right-aligned in ``width`` columns."""
    import torch

    template = next(f for f in found if f is not None)
    all_keys, all_values = [], []
    for layer in range(len(template.keys)):
        shape = list(template.keys[layer].shape)
        shape[0], shape[2] = len(found), width
        keys = torch.zeros(shape, dtype=template.keys[layer].dtype, device=device)
        values = torch.zeros_like(keys)
        for r, entry in enumerate(found):
            if entry is not None:
                n = len(entry.ids)
                keys[r, :, width - n :] = entry.keys[layer][0]
                values[r, :, width - n :] = entry.values[layer][0]
        all_keys.append(keys)
        all_values.append(values)
    return KVBuffer(all_keys, all_values)


def _extract(kv, row: int, key_pos: torch.Tensor, ids: tuple[int, ...]) -> CachedPrefix:
    """Row ``row``'s keys and values (``key_pos`` is its position row), in token order."""
    columns = (key_pos >= 0).nonzero().squeeze(1)
    if len(columns) != len(ids):
        raise RuntimeError(f"cache holds {len(columns)} tokens of a {len(ids)}-token sequence")
    layers = [kv.layer(i) for i in range(len(kv))]
    keys = [k[row : row + 1, :, columns].clone() for k, _ in layers]
    values = [v[row : row + 1, :, columns].clone() for _, v in layers]
    return CachedPrefix(ids, keys, values)


def _merge(kv_a, pos_a: torch.Tensor, kv_b, pos_b: torch.Tensor):
    """Stacks two batches' caches, right-aligning both in the wider one's columns."""
    import torch

    width = max(pos_a.shape[1], pos_b.shape[1])

    def widen(t: torch.Tensor, fill) -> torch.Tensor:
        missing = width - t.shape[-1] if t.dim() == 2 else width - t.shape[2]
        if not missing:
            return t
        if t.dim() == 2:
            return torch.cat([t.new_full((t.shape[0], missing), fill), t], dim=1)
        pad = t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3])
        return torch.cat([pad, t], dim=2)

    keys, values = [], []
    for i in range(len(kv_a)):
        (ka, va), (kb, vb) = kv_a.layer(i), kv_b.layer(i)
        keys.append(torch.cat([widen(ka, 0), widen(kb, 0)]))
        values.append(torch.cat([widen(va, 0), widen(vb, 0)]))
    return KVBuffer(keys, values), torch.cat([widen(pos_a, -1), widen(pos_b, -1)])


def _compact(kv, key_pos: torch.Tensor):
    """Drops empty columns: each row's tokens moved, in order, to the right of a narrower cache."""
    import torch

    valid = key_pos >= 0
    counts = valid.sum(dim=1)
    width = int(counts.max())
    # Column to read for each (row, new column): the row's valid columns, right-aligned.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :width]  # valid columns first, in order
    shift = width - counts
    target = torch.arange(width, device=key_pos.device)[None, :] - shift[:, None]  # index into the valid list
    source = order.gather(1, target.clamp(min=0))
    empty = target < 0
    new_pos = key_pos.gather(1, source).masked_fill(empty, -1)
    keys, values = [], []
    for i in range(len(kv)):
        k, v = kv.layer(i)
        index = source[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        keys.append(k.gather(2, index))
        values.append(v.gather(2, index))
    return KVBuffer(keys, values), new_pos


ATTENTION = "agentloop_sdpa"
"""Name under which :func:`grouped_attention` is registered with transformers."""


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA with an explicit mask for grouped-query attention, without copying keys and values.

    transformers' ``sdpa`` repeats every key/value head once per query head it serves when a
    mask is given (4 copies of the whole cache per layer and step for Gemma 3, which has 4
    query heads on 1 key/value head). Here the query heads of a group are folded into the
    query axis instead: ``[b, kv * g, q, d]`` becomes ``[b, kv, g * q, d]`` against the
    un-copied ``[b, kv, k, d]`` keys, with the mask repeated over the folded rows.
    """
    import torch

    b, heads, q, d = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    folded = query.reshape(b, kv_heads, group * q, d)
    mask = attention_mask
    if mask is None and q > 1 and kwargs.get("is_causal", getattr(module, "is_causal", True)):
        # transformers leaves out a plain causal mask (SDPA's is_causal would do); folded rows need it
        k = key.shape[2]
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]].repeat(1, 1, group, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def use_grouped_attention(model) -> None:
    """Makes ``model`` (a transformers model using SDPA) attend with :func:`grouped_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, grouped_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # masks the model builds itself: SDPA's format
    model.set_attn_implementation(ATTENTION)


def _sliding_window(config) -> int | None:
    types = getattr(config, "layer_types", None) or []
    return getattr(config, "sliding_window", None) if "sliding_attention" in types else None


def _masks(config, query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None):
    """Attention masks from true positions: ``[rows, 1, queries, keys]``, True = attend.

    A padded query (position -1) attends only to its own column, which no real query sees:
    a query that attends to nothing would make NaNs that spread through the padding's keys.
    """
    import torch

    q, k = query_pos[:, :, None], key_pos[:, None, :]
    causal = (k >= 0) & (k <= q)
    pad_query = query_pos < 0
    if pad_query.any():
        own = torch.zeros_like(causal)
        offset = key_pos.shape[1] - query_pos.shape[1]
        idx = torch.arange(query_pos.shape[1], device=query_pos.device)
        own[:, idx, offset + idx] = True
        causal = torch.where(pad_query[:, :, None], own, causal)
    masks = {"full_attention": causal[:, None]}
    if window is not None:
        masks["sliding_attention"] = (causal & ((q - k < window) | pad_query[:, :, None]))[:, None]
    if getattr(config, "_attn_implementation", "sdpa") == "eager":
        masks = {name: _additive(mask) for name, mask in masks.items()}
    types = getattr(config, "layer_types", None)
    return masks if types else masks["full_attention"]


def _additive(mask: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
