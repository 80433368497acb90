"""ALFWorld's games: reading a split of ``<data_dir>/alfworld/json_2.1.1``."""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from agentloop.types import Task

SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
"""The data's split folders."""
TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
"""ALFWorld's six task types (a game folder's name starts with one)."""


_TASK_SENTENCE = re.compile(r"Your task is to: ([^\"\n]*)")


@dataclass(frozen=True)
class ALFWorldTask:
    """One game: its record, its game file and its expert walkthrough."""

    task: Task
    game_file: Path
    walkthrough: tuple[str, ...]
    game_text: str = field(default="", repr=False)
    """An imagined game's file content ("" for the data's games): an environment writes it to
    ``game_file`` where that is missing (on another machine of the cluster, say)."""

    def ensure_file(self) -> None:
        """Writes an imagined game's file if it is missing."""
        if self.game_text:
            write_once(self.game_file, self.game_text)


def write_once(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` unless the file exists, atomically: a reader sees all of it or none."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_text(text)
        partial.replace(path)


def task_sentence(grammar: str, sentence: str) -> str:
    """A game grammar with its task sentence ("Your task is to: ...") replaced by ``sentence``."""
    if not _TASK_SENTENCE.search(grammar):
        raise ValueError("the grammar holds no task sentence")
    return _TASK_SENTENCE.sub(lambda _: f"Your task is to: {sentence}", grammar, count=1)


def load_alfworld_tasks(data_dir: Path, split: str) -> list[ALFWorldTask]:
    """The solvable games of one split, in sorted folder order.

    Raises:
        ValueError: For an unknown split, or a game folder of no known task type.
        FileNotFoundError: When the split's folder is missing from ``data_dir``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown alfworld split {split!r}; known splits: {list(SPLITS)}")
    root = Path(data_dir) / "alfworld" / "json_2.1.1" / split
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: see docs/data.md to fetch ALFWorld's json_2.1.1 games")
    tasks = []
    for game_file in sorted(root.glob("*/*/game.tw-pddl")):
        data = json.loads(game_file.read_text())
        if not data.get("solvable", True):
            continue
        folder, trial = game_file.parent.parent.name, game_file.parent.name
        kind = next((t for t in TASK_TYPES if folder.startswith(t + "-")), None)
        if kind is None:
            raise ValueError(f"{game_file}: the folder {folder!r} names no ALFWorld task type")
        sentence = _TASK_SENTENCE.search(data["grammar"])
        instruction = sentence.group(1).strip() if sentence else folder
        task = Task("alfworld", f"{folder}/{trial}", split, kind, instruction)
        tasks.append(ALFWorldTask(task, game_file, tuple(data.get("walkthrough") or ())))
    if not tasks:
        raise FileNotFoundError(f"no game.tw-pddl under {root}")
    return tasks
