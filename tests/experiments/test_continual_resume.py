"""experiments/continual.py: a run forked after its first phase may change the SFT replay, and not later."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agentloop.config import ConfigError, load_config
from agentloop.loop import check_resume

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import continual  # noqa: E402

OVERRIDES = ["envs=[{name: db}, {name: os}]", "phases=[[db], [os]]", "iterations=0"]


def test_the_sft_replay_may_change_after_the_first_phase_only(data_dir, monkeypatch):
    monkeypatch.setenv("AGENTLOOP_DATA_DIR", str(data_dir))  # the config checks that its data_dir exists
    saved = load_config(continual.ContinualConfig, None, [*OVERRIDES, "sft.replay_fraction=0"])
    replayed = load_config(continual.ContinualConfig, None, [*OVERRIDES, "sft.replay_fraction=0.1"])
    phase_one = ["experts", "eval/base", "sft/1", "eval/sft-1"]
    assert check_resume(saved, replayed, phase_one, continual.stage_reads()) == ["sft.replay_fraction"]
    with pytest.raises(ConfigError, match="sft.replay_fraction: completed stage sft/2"):
        check_resume(saved, replayed, [*phase_one, "sft/2"], continual.stage_reads())
    more = load_config(continual.ContinualConfig, None, [*OVERRIDES, "sft.replay_fraction=0", "sft.epochs=3"])
    with pytest.raises(ConfigError, match="sft.epochs: completed stage sft/1"):
        check_resume(saved, more, phase_one, continual.stage_reads())
