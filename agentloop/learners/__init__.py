"""Learners: LoRA SFT and ETO's trajectory-level DPO on TRL, and the data they train on.

The policy is a fixed base checkpoint plus one PEFT LoRA adapter directory. ``train_sft``
creates (or continues) the adapter; each ``train_dpo`` round continues it against the
policy as it was at the start of the round, and writes a new adapter directory.

Experience replay is the loop's step: each DPO round trains on its own pairs plus
``mix_replay(new, old, DPOLearnerConfig.replay_fraction, rng)`` of earlier rounds' pairs.

Importing this package is light: torch, transformers, TRL and PEFT load when training starts.
"""

from agentloop.learners.data import build_pairs, cut_trajectory, dpo_examples, mix_replay, sft_examples
from agentloop.learners.dpo import DPOLearnerConfig, train_dpo
from agentloop.learners.sft import SFTLearnerConfig, train_sft

__all__ = [
    "DPOLearnerConfig",
    "SFTLearnerConfig",
    "build_pairs",
    "cut_trajectory",
    "dpo_examples",
    "mix_replay",
    "sft_examples",
    "train_dpo",
    "train_sft",
]
