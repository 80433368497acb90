"""Policies: turn formats, model loading and generation backends."""

from __future__ import annotations

from typing import Any

from agentloop.policy.base import PolicyConfig


def make_policy(config: PolicyConfig) -> Any:
    """The backend ``config.backend`` names, built from ``config``."""
    if config.backend == "vllm":
        from agentloop.policy.vllm_backend import VLLMPolicy

        return VLLMPolicy(config)
    from agentloop.policy.hf import HFPolicy

    return HFPolicy(config)
