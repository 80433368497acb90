"""The typed config loader: types, unknown keys, overrides and validation fail early."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from agentloop.config import ConfigError, from_dict, load_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-5
    modules: tuple[str, ...] = ("q_proj",)
    mode: Literal["a", "b"] = "a"

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


@dataclass
class Outer:
    name: str = "x"
    steps: int = 1
    path: Path | None = None
    inner: Inner = field(default_factory=Inner)
    layers: list[Inner] = field(default_factory=list)
    tuned: Inner = field(default_factory=lambda: Inner(lr=0.5, mode="b"))


@dataclass
class Top:
    outer: Outer = field(default_factory=lambda: Outer(steps=7, tuned=Inner(lr=0.25)))


def test_yaml_and_overrides(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("name: y\ninner:\n  lr: 2\n")
    config = load_config(Outer, yaml_file, ["steps=3", "inner.modules=[a, b]", "path=/tmp/z", "inner.mode=b"])
    assert config == Outer(name="y", steps=3, path=Path("/tmp/z"), inner=Inner(lr=2.0, modules=("a", "b"), mode="b"))
    assert to_dict(config)["inner"]["lr"] == 2.0
    config = load_config(Outer, None, ["layers=[{lr: 3}, {mode: b}]"])
    assert config.layers == [Inner(lr=3.0), Inner(mode="b")]


def test_a_section_given_in_part_keeps_the_rest_of_its_field_default():
    # The parent's default_factory, not the section's class defaults, fills what is not given.
    assert load_config(Outer, None, ["tuned.modules=[k]"]).tuned == Inner(lr=0.5, modules=("k",), mode="b")
    config = load_config(Top, None, ["outer.tuned.mode=b", "outer.name=z"])
    assert config.outer == Outer(name="z", steps=7, tuned=Inner(lr=0.25, mode="b"))
    assert load_config(Outer, None, ["tuned={lr: 2}"]).tuned.mode == "b"
    with pytest.raises(ConfigError, match="tuned.lrr"):
        load_config(Outer, None, ["tuned.lrr=1"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"stepz": 1}, "unknown key"),
        ({"inner": {"lrr": 1}}, "inner.lrr"),
        ({"steps": "3"}, "steps: expected int"),
        ({"steps": True}, "steps: expected int"),
        ({"inner": {"lr": -1.0}}, "inner.lr must be > 0"),
        ({"inner": {"mode": "c"}}, "inner.mode"),
        ({"inner": 3}, "inner: expected a mapping"),
        ({"layers": [{"lr": 1.0}, {"lr": 0.0}]}, r"layers\[1\]\.lr must be > 0"),
        ({"layers": [{"lrr": 1.0}]}, r"layers\[0\]\.lrr"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(Outer, None, ["steps"])


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        ({"avx2": True}, "float32"),  # bf16 would be emulated: 100x slower than fp32 on an AVX2 EPYC
        ({"avx2": True, "avx512_f": True, "avx512_bf16": True}, "bfloat16"),
        ({"avx2": True, "amx_bf16": True}, "bfloat16"),
    ],
)
def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch, capabilities, expected):
    import torch

    from agentloop.config import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_dtype("auto") == expected
    assert resolve_dtype("bfloat16") == "bfloat16" and resolve_dtype("float32") == "float32"  # a choice is kept


def test_the_policy_and_learners_choose_their_dtype_by_default_and_refuse_an_unknown_one():
    from agentloop.learners.sft import SFTLearnerConfig
    from agentloop.policy.base import PolicyConfig

    assert PolicyConfig().dtype == "auto" and SFTLearnerConfig().dtype == "auto"
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(PolicyConfig, {"dtype": "float16"})
    with pytest.raises(ConfigError, match="dtype"):
        load_config(SFTLearnerConfig, None, ["dtype=fp8"])
