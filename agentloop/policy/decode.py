"""Batched decoding for transformers causal LMs, with a prefix cache across turns.

Two costs dominate multi-turn generation with ``model.generate`` on a CPU: every row of a
batch runs until the longest one stops, and every turn prefills the whole conversation
again. :func:`decode` removes both:

- A row leaves the batch as soon as it emits a stop token, and a waiting prompt takes its
  slot (continuous batching). Joining and leaving edit one key/value buffer in place: a
  CPU spends as long copying a whole batch's cache as on a decode step, and a heap whose
  gigabyte-sized buffers are freed and reallocated at every join fragments.
- The keys and values of a finished turn are kept in a :class:`PrefixCache`. The next turn
  of the same conversation starts with those tokens, so only its new tokens (the end of the
  last reply and the new observation) go through the model.

Rows resume from caches of different lengths, so a batch is laid out as
``[padding, cached tokens, padding, new tokens]`` per row and the attention masks are built
here from each key's true position, not its column: causal, the sliding window of local
layers (Gemma 3 alternates local and global layers), and no attention to padding. A local
layer attends only to the columns its window reaches in some row (the last ones: each row's
newest tokens are on the right), so its cost does not grow with the conversation. The
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
    """The keys and values of a running batch, per layer ``[rows, kv_heads, capacity, head_dim]``.

    Each layer holds its filled columns ``[start, end)`` inside a larger tensor, so the common
    changes are done in place: a decode step writes its column into the spare room on the right
    (transformers' ``DynamicCache`` concatenates, copying the whole cache at every step),
    columns no row uses any more are dropped from the left by moving ``start``, and a row that
    joins writes its keys and values into a free row. Only running out of room copies the
    whole buffer. The model's attention layers call :meth:`update`, the only method they need.
    """

    def __init__(self, keys=None, values=None, filled: int | None = None) -> None:
        """Holds copies of ``keys``/``values`` with spare room, or, with ``filled``, the tensors
        themselves, of which the first ``filled`` columns hold keys and values."""
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._starts: list[int] = []
        self._ends: list[int] = []
        for k, v in zip(keys or [], values or [], strict=True):
            if filled is None:
                self._append_layer(k, v)
            else:
                self._keys.append(k)
                self._values.append(v)
                self._starts.append(0)
                self._ends.append(filled)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def rows(self) -> int:
        return self._keys[0].shape[0] if self._keys else 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's filled columns."""
        start, end = self._starts[index], self._ends[index]
        return self._keys[index][:, :, start:end], self._values[index][:, :, start:end]

    def update(self, key_states, value_states, layer_idx: int, cache_kwargs=None):
        if layer_idx == len(self._keys):
            self._append_layer(key_states, value_states)
            return self.layer(layer_idx)
        end, q = self._ends[layer_idx], key_states.shape[2]
        if end + q > self._keys[layer_idx].shape[2]:
            self._relayout(layer_idx, left=0, right=q)
            end = self._ends[layer_idx]
        self._keys[layer_idx][:, :, end : end + q] = key_states
        self._values[layer_idx][:, :, end : end + q] = value_states
        self._ends[layer_idx] = end + q
        return self.layer(layer_idx)

    def select(self, rows: torch.Tensor) -> None:
        """Keeps only ``rows`` (a 1-D index tensor)."""
        self._keys = [k[rows] for k in self._keys]
        self._values = [v[rows] for v in self._values]

    def add_rows(self, count: int) -> None:
        """Appends ``count`` rows of zeros."""
        import torch

        def grown(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(count, *t.shape[1:])])

        self._keys = [grown(k) for k in self._keys]
        self._values = [grown(v) for v in self._values]

    def drop_left(self, columns: int) -> None:
        """Forgets the first ``columns`` filled columns (no copy)."""
        self._starts = [s + columns for s in self._starts]

    def pad_left(self, columns: int) -> None:
        """Puts ``columns`` more columns before the filled ones: earlier columns of the tensor
        (old keys and values, finite), or zeros when it has no room on the left."""
        for i, start in enumerate(self._starts):
            if start >= columns:
                self._starts[i] = start - columns
            else:
                self._relayout(i, left=columns, right=0)
                self._starts[i] -= columns

    def write(self, rows: torch.Tensor, source: KVBuffer, source_rows: torch.Tensor) -> None:
        """Copies ``source``'s rows into ``rows``, right-aligned in the filled columns."""
        for i in range(len(self._keys)):
            keys, values = source.layer(i)
            width, end = keys.shape[2], self._ends[i]
            self._keys[i][rows, :, end - width : end] = keys[source_rows]
            self._values[i][rows, :, end - width : end] = values[source_rows]

    def _append_layer(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._keys.append(keys)
        self._values.append(values)
        self._starts.append(0)
        self._ends.append(keys.shape[2])
        self._relayout(len(self._keys) - 1, left=0, right=0)

    def _relayout(self, index: int, *, left: int, right: int) -> None:
        """Copies one layer's filled columns into a new tensor with ``left`` zero columns before
        them and room for at least ``right`` more after them, plus spare room on both sides."""
        import torch

        start, end = self._starts[index], self._ends[index]
        filled = end - start
        spare = max(64, filled // 4)
        before = left + (spare if left else 0)
        for tensors in (self._keys, self._values):
            t = tensors[index]
            shape = (t.shape[0], t.shape[1], before + filled + right + spare, t.shape[3])
            out = torch.empty(shape, dtype=t.dtype, device=t.device)
            out[:, :, :before].zero_()
            out[:, :, before : before + filled] = t[:, :, start:end]
            tensors[index] = out
        self._starts[index], self._ends[index] = before, before + filled


class DecodeEngine:
    """Continuous batching: requests join and leave a running batch one token step at a time.

    ``add`` queues a prompt; each ``step`` either admits queued prompts (one prefill forward
    for them, resumed from the prefix cache where possible, then written into free rows of
    the batch) or advances every running row by one token, and returns the requests that
    finished. A finished request's keys and values go to the prefix cache, so when its
    conversation comes back with one more turn only the new tokens are prefilled.

    The batch is a set of slots (rows of one :class:`KVBuffer`). A request that ends frees
    its slot and the next one admitted takes it, so joining and leaving copy only the rows
    that change, not the whole cache; an idle slot rides along masked until it is reused,
    and the batch shrinks when at least half its slots are idle and no prompt waits.

    Batch layout: ``key_pos[slot, column]`` is the position of the token whose keys and
    values sit in that cache column, or -1 for an empty column (padding, an idle slot, or
    columns a slot's request does not use). Attention masks are built from these positions.
    """

    def __init__(
        self,
        model,
        *,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        pad_id: int,
        pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        max_rows: int,
        cache: PrefixCache | None = None,
    ) -> None:
        self.model, self.max_new_tokens, self.pad_id, self.pick = model, max_new_tokens, pad_id, pick
        self.max_rows, self.cache = max_rows, cache
        self.device = next(model.parameters()).device
        self.stops = frozenset(stop_ids)
        self.window = _sliding_window(model.config)
        self.waiting: deque[tuple[Hashable, tuple[int, ...]]] = deque()
        self.slots: list[Hashable | None] = []  # request of each slot of the batch; None = idle
        self.prompts: dict[Hashable, tuple[int, ...]] = {}
        self.outputs: dict[Hashable, list[int]] = {}
        self.logprobs: dict[Hashable, list[float]] = {}  # of each generated token, raw model distribution
        self.temperatures: dict[Hashable, float] = {}  # of each request (0 = greedy)
        self.limits: dict[Hashable, int] = {}  # most new tokens of each request
        self.kv: KVBuffer | None = None  # keys and values of the slots
        self.key_pos: torch.Tensor | None = None
        self.next_tokens: torch.Tensor | None = None  # each slot's last sampled token, not yet fed

    def add(
        self, key: Hashable, prompt: Sequence[int], temperature: float = 0.0, max_new_tokens: int | None = None
    ) -> None:
        """Queues ``prompt``; its tokens are drawn at ``temperature`` (0 = greedy) by ``pick``, at most
        ``max_new_tokens`` of them (None: the engine's ``max_new_tokens``)."""
        if key in self.prompts:
            raise ValueError(f"request {key!r} is already running")
        if not prompt:
            raise ValueError(f"request {key!r} has an empty prompt")
        self.prompts[key] = tuple(prompt)
        self.temperatures[key] = temperature
        self.limits[key] = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.waiting.append((key, tuple(prompt)))

    def restart(self) -> None:
        """Sends the running requests back to the front of the queue, their tokens and keys
        dropped: after new weights, each is generated again from its prompt."""
        running = [key for key in self.slots if key is not None]
        for key in reversed(running):
            self.waiting.appendleft((key, self.prompts[key]))
            del self.outputs[key], self.logprobs[key]
        self.kv = self.key_pos = self.next_tokens = None
        self.slots = []

    @property
    def running(self) -> int:
        """Requests in the batch."""
        return sum(key is not None for key in self.slots)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> list[tuple[Hashable, list[int], list[float]]]:
        """One forward pass; returns ``(key, generated ids, their log-probs)`` of the requests that ended."""
        import torch

        with torch.inference_mode():  # the cache's tensors are inference tensors: edit them in this mode
            if self.waiting and self._admit_now():
                return self._admit()
            if self.running:
                if 2 * self.running <= len(self.slots):
                    self._shrink()
                return self._decode()
            return []

    def _admit_now(self) -> bool:
        running = self.running
        free = self.max_rows - running
        # Prefill in groups: a lone prompt waits while the batch is still mostly full.
        return free > 0 and (running <= self.max_rows // 2 or len(self.waiting) >= max(1, free // 2))

    def _admit(self) -> list[tuple[Hashable, list[int]]]:
        """Prefills waiting prompts into the free slots, in groups of rows with similar numbers of new tokens."""
        free = self.max_rows - self.running
        group = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
        found = [self.cache.pop(p) if self.cache is not None else None for _, p in group]
        new = [len(p) - (len(f.ids) if f else 0) for (_, p), f in zip(group, found, strict=True)]
        finished = []
        for rows in prefill_groups(new):
            finished += self._prefill([group[r] for r in rows], [found[r] for r in rows])
        return finished

    def _prefill(self, group, found: list[CachedPrefix | None]) -> list[tuple[Hashable, list[int]]]:
        """One forward pass over ``group``'s new tokens (each resuming from its ``found`` cache entry), then the
        rows that go on join the batch."""
        import torch

        cached = [len(f.ids) if f else 0 for f in found]
        new = [p[c:] for (_, p), c in zip(group, cached, strict=True)]
        width_cached, width_new = max(cached), max(len(n) for n in new)

        kv = _fill_cache(found, width_cached, width_new, self.device) if width_cached else KVBuffer()
        key_pos = torch.full((len(group), width_cached + width_new), -1, dtype=torch.long)
        input_ids = torch.full((len(group), width_new), self.pad_id, dtype=torch.long)
        for r, (c, tokens) in enumerate(zip(cached, new, strict=True)):
            key_pos[r, width_cached - c : width_cached] = torch.arange(c)
            input_ids[r, width_new - len(tokens) :] = torch.tensor(tokens)
            key_pos[r, width_cached + width_new - len(tokens) :] = torch.arange(c, c + len(tokens))
        key_pos = key_pos.to(self.device)
        keys = [key for key, _ in group]
        temperatures = torch.tensor([self.temperatures[key] for key in keys], device=self.device)
        tokens, logprobs = self._forward(
            input_ids.to(self.device), key_pos[:, width_cached:], key_pos, kv, temperatures
        )
        for key in keys:
            self.outputs[key], self.logprobs[key] = [], []
        going, finished = self._record(keys, tokens, logprobs, kv, key_pos)
        if going:
            self._join([keys[r] for r in going], kv, key_pos, tokens, torch.tensor(going, device=self.device))
        return finished

    def _decode(self) -> list[tuple[Hashable, list[int]]]:
        import torch

        idle = torch.tensor([key is None for key in self.slots], device=self.device)
        query_pos = (self.key_pos.max(dim=1).values + 1).masked_fill(idle, -1).unsqueeze(1)
        key_pos = torch.cat([self.key_pos, query_pos], dim=1)
        temperatures = torch.tensor(
            [0.0 if key is None else self.temperatures[key] for key in self.slots], device=self.device
        )
        tokens, logprobs = self._forward(self.next_tokens.unsqueeze(1), query_pos, key_pos, self.kv, temperatures)
        going, finished = self._record(self.slots, tokens, logprobs, self.kv, key_pos)
        kept = set(going)
        ended = [s for s, key in enumerate(self.slots) if key is not None and s not in kept]
        for s in ended:
            self.slots[s] = None
        if ended:
            key_pos[ended] = -1
        self.key_pos, self.next_tokens = key_pos, tokens.masked_fill(idle, self.pad_id)
        self._trim()
        return finished

    def _record(self, keys, tokens, logprobs, kv, key_pos) -> tuple[list[int], list]:
        """Appends each row's new token; returns the rows that go on, and the requests that ended
        (their keys and values go to the prefix cache). Rows whose key is None are skipped."""
        going, finished = [], []
        for row, (key, token, logprob) in enumerate(zip(keys, tokens.tolist(), logprobs.tolist(), strict=True)):
            if key is None:
                continue
            generated = self.outputs[key]
            generated.append(token)
            self.logprobs[key].append(logprob)
            if token not in self.stops and len(generated) < self.limits[key]:
                going.append(row)
                continue
            prompt = self.prompts.pop(key)
            del self.outputs[key], self.temperatures[key], self.limits[key]
            if self.cache is not None:
                self.cache.put(_extract(kv, row, key_pos[row], prompt + tuple(generated[:-1])))
            finished.append((key, generated, self.logprobs.pop(key)))
        return going, finished

    def _join(self, keys, kv: KVBuffer, key_pos: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> None:
        """Puts ``rows`` of a prefilled group (``kv``, ``key_pos``, sampled ``tokens``) into idle slots."""
        import torch

        if self.kv is None:
            if len(rows) < kv.rows:
                kv.select(rows)
            self.kv, self.key_pos, self.next_tokens, self.slots = kv, key_pos[rows], tokens[rows], list(keys)
            return
        width, columns = key_pos.shape[1], self.key_pos.shape[1]
        if width > columns:
            self.kv.pad_left(width - columns)
            self.key_pos = torch.cat([self.key_pos.new_full((len(self.slots), width - columns), -1), self.key_pos], 1)
        idle = [s for s, key in enumerate(self.slots) if key is None]
        if len(idle) < len(keys):
            added = len(keys) - len(idle)
            idle += range(len(self.slots), len(self.slots) + added)
            self.kv.add_rows(added)
            self.slots += [None] * added
            self.key_pos = torch.cat([self.key_pos, self.key_pos.new_full((added, self.key_pos.shape[1]), -1)])
            self.next_tokens = torch.cat([self.next_tokens, self.next_tokens.new_full((added,), self.pad_id)])
        slots = torch.tensor(idle[: len(keys)], device=self.device)
        self.kv.write(slots, kv, rows)  # an idle slot's positions are all -1 (set when its request ended)
        self.key_pos[slots, self.key_pos.shape[1] - width :] = key_pos[rows]
        self.next_tokens[slots] = tokens[rows]
        for s, key in zip(slots.tolist(), keys, strict=True):
            self.slots[s] = key

    def _shrink(self) -> None:
        """Drops the idle slots (one copy of the running rows)."""
        import torch

        keep = [s for s, key in enumerate(self.slots) if key is not None]
        index = torch.tensor(keep, device=self.device)
        self.kv.select(index)
        self.key_pos, self.next_tokens = self.key_pos[index], self.next_tokens[index]
        self.slots = [self.slots[s] for s in keep]

    def _trim(self) -> None:
        """Drops columns no slot uses: on the left without a copy; gaps inside by compacting."""
        if not self.running:
            self.kv = self.key_pos = self.next_tokens = None
            self.slots = []
            return
        used = (self.key_pos >= 0).any(dim=0)
        first = int(used.int().argmax())
        if first:
            self.kv.drop_left(first)
            self.key_pos = self.key_pos[:, first:]
        if self._sparse():
            self.kv, self.key_pos = _compact(self.kv, self.key_pos)

    def _forward(self, input_ids, query_pos, key_pos, kv, temperatures) -> tuple[torch.Tensor, torch.Tensor]:
        """The model on ``input_ids`` (run inside :meth:`step`'s inference mode); the next tokens,
        drawn at each row's temperature, and their log-probs under the model's own (raw) distribution."""
        import torch

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
        tokens = self.pick(logits, temperatures)
        # log p = logit - logsumexp: two passes over the vocabulary, no full log_softmax written.
        return tokens, logits.gather(1, tokens.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)

    def _sparse(self) -> bool:
        """True when empty columns make up most of the cache (rows that joined late, or left)."""
        used = int((self.key_pos >= 0).sum(dim=1).max())
        return self.key_pos.shape[1] > 2 * used + 64


PREFILL_SLACK = 512
"""Padding tokens a prefill group takes on beyond half its real new tokens before it is split."""


def prefill_groups(new: Sequence[int]) -> list[list[int]]:
    """Splits the rows of one admission (``new``: each row's tokens to prefill) into groups prefilled
    one forward pass each, shortest first.

    A forward pass pads every row to its longest one, and pays for the padding as for real tokens:
    a new conversation (its whole prompt) among continuing ones (a short observation each), as when
    the rollout starts a new episode, would have every row prefill the new one's length. A group
    grows while its padding stays within half its real tokens plus :data:`PREFILL_SLACK`.
    """
    groups: list[list[int]] = []
    total = 0  # real new tokens of the last group
    for r in sorted(range(len(new)), key=new.__getitem__):
        grown = total + new[r]
        if groups and (len(groups[-1]) + 1) * new[r] - grown <= grown // 2 + PREFILL_SLACK:
            groups[-1].append(r)
            total = grown
        else:
            groups.append([r])
            total = new[r]
    return groups


def _fill_cache(found: list[CachedPrefix | None], width: int, room: int, device) -> KVBuffer:
    """A buffer holding each row's cached keys and values right-aligned in ``width`` columns,
    with room for ``room`` more columns (the prompts' new tokens)."""
    import torch

    template = next(f for f in found if f is not None)
    all_keys, all_values = [], []
    for layer in range(len(template.keys)):
        shape = list(template.keys[layer].shape)
        shape[0], shape[2] = len(found), width + room
        keys = torch.empty(shape, dtype=template.keys[layer].dtype, device=device)
        values = torch.empty_like(keys)
        keys[:, :, :width].zero_()
        values[:, :, :width].zero_()
        for r, entry in enumerate(found):
            if entry is not None:
                n = len(entry.ids)
                keys[r, :, width - n : width] = entry.keys[layer][0]
                values[r, :, width - n : width] = entry.values[layer][0]
        all_keys.append(keys)
        all_values.append(values)
    return KVBuffer(all_keys, all_values, filled=width)


def _extract(kv, row: int, key_pos: torch.Tensor, ids: tuple[int, ...]) -> CachedPrefix:
    """Row ``row``'s keys and values (``key_pos`` is its position row), in token order."""
    columns = (key_pos >= 0).nonzero().squeeze(1)
    if len(columns) != len(ids):
        raise RuntimeError(f"cache holds {len(columns)} tokens of a {len(ids)}-token sequence")
    layers = [kv.layer(i) for i in range(len(kv))]
    keys = [k[row : row + 1, :, columns] for k, _ in layers]  # indexing with a tensor copies
    values = [v[row : row + 1, :, columns] for _, v in layers]
    return CachedPrefix(ids, keys, values)


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

    A mask narrower than the keys covers their last columns (a local layer's window, see
    :func:`_masks`): the keys and values left of it are not attended to, so they are left out.
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
        if mask.shape[-1] < key.shape[2]:
            key, value = key[:, :, -mask.shape[-1] :], value[:, :, -mask.shape[-1] :]
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
    attention = getattr(config, "_attn_implementation", "sdpa")
    if window is not None:
        local = causal & ((q - k < window) | pad_query[:, :, None])
        if attention == ATTENTION:  # only the columns some query reaches: grouped_attention drops the others
            first = int(local.any(dim=1).any(dim=0).int().argmax())
            local = local[:, :, first:]
        masks["sliding_attention"] = local[:, None]
    if attention == "eager":
        masks = {name: _additive(mask) for name, mask in masks.items()}
    types = getattr(config, "layer_types", None)
    return masks if types else masks["full_attention"]


def _additive(mask: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
