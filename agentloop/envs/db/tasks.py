"""The dbbench tasks: reading a split of ``<data_dir>/dbbench``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentloop.types import Task

if TYPE_CHECKING:
    pass

ENV_NAME = "db"
SPLIT_FILES = {"train": "standard.jsonl", "dev": "dev.jsonl"}
"""The file of each split inside ``<data_dir>/dbbench``."""
WRITE_KINDS = ("INSERT", "UPDATE")
"""Task kinds scored by the table they leave behind; every other task is a ``SELECT``."""


@dataclass(frozen=True)
class DBTask:
    """One dbbench task: a question or a change request over one table."""

    task: Task
    """The task as the loop and the store see it (``kind`` is SELECT, INSERT or UPDATE)."""
    query_type: str
    """AgentBench's finer type: ``INSERT``, ``UPDATE``, ``counting``, ``aggregation-AVG``, ..."""
    table_name: str
    """Name of the task's only table."""
    columns: tuple[tuple[str, str], ...]
    """The table's columns as (name, declared type), in order."""
    rows: tuple[tuple[Any, ...], ...]
    """The table's rows, as stored in the data file."""
    label: tuple[str, ...]
    """The expected answer values of a SELECT task; empty for INSERT and UPDATE."""
    gold_sql: str
    """The reference SQL (MySQL-flavoured, often imperfect for SELECT tasks)."""
    gold_dialect: str = "mysql"
    """The dialect ``gold_sql`` is written in: ``mysql`` (dbbench's), or ``sqlite`` (an imagined
    task's SQL, which ran as written when the task was made)."""

    @property
    def is_write(self) -> bool:
        """Whether the task is scored by the table it leaves behind."""
        return self.task.kind in WRITE_KINDS


def load_db_tasks(data_dir: Path, split: str) -> list[DBTask]:
    """Reads one split of the dbbench tasks.

    Args:
        data_dir: The task data directory (the one holding ``dbbench/``).
        split: ``"train"`` (``standard.jsonl``) or ``"dev"`` (``dev.jsonl``).

    Raises:
        ValueError: For an unknown split or a malformed line.
        FileNotFoundError: When the directory or the split's file is missing.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown dbbench split {split!r}; known splits: {sorted(SPLIT_FILES)}")
    folder = Path(data_dir) / "dbbench"
    if not folder.is_dir():
        raise FileNotFoundError(f"dbbench data directory not found: {folder} (set the data directory)")
    path = folder / SPLIT_FILES[split]
    if not path.is_file():
        raise FileNotFoundError(f"dbbench split file not found: {path}")
    tasks = []
    with path.open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            try:
                tasks.append(_parse_task(json.loads(line), split, index))
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise ValueError(f"{path}, line {index + 1}: malformed dbbench task ({e!r})") from e
    return tasks


def _parse_task(entry: dict[str, Any], split: str, index: int) -> DBTask:
    query_type = str(entry["type"][0])
    kind = query_type if query_type in WRITE_KINDS else "SELECT"
    table = entry["table"]
    info = table["table_info"]
    write = kind in WRITE_KINDS
    task = Task(
        env=ENV_NAME,
        task_id=f"{split}-{index:04d}",
        split=split,
        kind=kind,
        instruction=str(entry["description"]),
    )
    return DBTask(
        task=task,
        query_type=query_type,
        table_name=str(table["table_name"]),
        columns=tuple((str(c["name"]), str(c["type"])) for c in info["columns"]),
        rows=tuple(tuple(row) for row in info["rows"]),
        label=() if write else tuple(str(v) for v in entry["label"]),
        gold_sql=str(entry["label"][0] if write else entry["sql"]["query"]),
    )
