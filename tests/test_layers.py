"""Layers import one way: types <- envs, memory, replay <- policy, learners <- actors <- loop."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "agentloop"
FORBIDDEN = {
    "envs": {
        "torch",
        "ray",
        "vllm",
        "trl",
        "transformers",
        "peft",
        "agentloop.policy",
        "agentloop.learners",
        "agentloop.actors",
        "agentloop.replay",
        "agentloop.memory",
        "agentloop.loop",
    },
    "memory": {
        "ray",
        "agentloop.actors",
        "agentloop.loop",
        "agentloop.learners",
        "agentloop.policy",
        "agentloop.replay",
    },
    "replay": {"ray", "torch", "agentloop.actors", "agentloop.loop", "agentloop.learners", "agentloop.policy"},
    "policy": {"ray", "agentloop.actors", "agentloop.loop", "agentloop.learners"},
    "learners": {"ray", "agentloop.actors", "agentloop.loop"},
    "types.py": {"agentloop", "torch", "ray"},
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_lower_layers(layer):
    files = [PACKAGE / layer] if layer.endswith(".py") else sorted((PACKAGE / layer).rglob("*.py"))
    bad = []
    for f in files:
        for name in _imports(f):
            if any(name == x or name.startswith(x + ".") for x in FORBIDDEN[layer]) and name != "agentloop.types":
                bad.append(f"{f.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_import_agentloop_is_light():
    code = (
        "import sys, agentloop, agentloop.types, agentloop.config, agentloop.envs\n"
        "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
