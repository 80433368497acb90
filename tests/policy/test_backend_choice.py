"""``policy.backend=auto``: vLLM where there is a GPU to run it, agentloop's engine on a CPU."""

from __future__ import annotations

import pytest

from agentloop.policy import choose_backend
from agentloop.policy.base import PolicyConfig


def test_auto_is_agentloops_engine_on_a_cpu_and_explicit_choices_stay():
    assert choose_backend(PolicyConfig()) == "transformers"  # the default is auto; these machines have no GPU
    assert choose_backend(PolicyConfig(backend="vllm")) == "vllm"
    assert choose_backend(PolicyConfig(backend="transformers")) == "transformers"


def test_auto_is_vllm_on_a_gpu_when_installed(monkeypatch: pytest.MonkeyPatch):
    import torch

    import agentloop.policy as policy

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a GPU node reports
    monkeypatch.setattr(policy, "find_spec", lambda name: object() if name == "vllm" else None)
    assert choose_backend(PolicyConfig()) == "vllm"
    monkeypatch.setattr(policy, "find_spec", lambda name: None)
    assert choose_backend(PolicyConfig()) == "transformers"
