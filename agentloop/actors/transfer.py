"""Moving small directories (LoRA adapters) between Ray processes by value.

Passing bytes through Ray's object store instead of a path means an adapter reaches the
rollout workers even when they run on nodes that share no filesystem with the learner.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

Files = dict[str, bytes]


def pack_dir(path: Path) -> Files:
    """All regular files under ``path``, keyed by relative path."""
    path = Path(path)
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def unpack_dir(files: Files, path: Path) -> Path:
    """Writes ``files`` to ``path`` atomically: the directory appears whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path
