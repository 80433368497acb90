"""Typed configuration: dataclasses loaded from YAML with ``a.b=value`` overrides.

Each component defines its own config dataclass beside its code; experiments compose them.
Loading checks every key and type and then calls each dataclass's ``validate()`` (when it
has one), so a bad value fails before any work starts, with the offending key in the
message. Nothing here rewrites a user's value.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def cache_dir() -> Path:
    """Where agentloop keeps what it builds once (converted models, imagined ALFWorld games):
    ``AGENTLOOP_CACHE``, else ``~/.cache/agentloop``."""
    return Path(os.environ.get("AGENTLOOP_CACHE", Path.home() / ".cache" / "agentloop")).expanduser()


DTYPES = ("auto", "bfloat16", "float32")
"""Values of every ``dtype`` setting (policy, learners): ``auto`` is :func:`resolve_dtype`'s choice."""


def resolve_dtype(dtype: str) -> str:
    """``dtype``, or for ``auto`` the one that computes fastest here: bfloat16 on a GPU that has it and on a
    CPU with bf16 instructions (AVX-512-bf16 or AMX), float32 elsewhere. A CPU without them (AVX2 only, as
    most laptops and AMD EPYC before Zen 4) runs bf16 matmuls emulated: a 2-core AVX2 EPYC multiplied at
    0.5 GFLOP/s in bf16 against 63 in fp32, where a Xeon with AMX does 480-650 in bf16 and 160-190 in fp32
    (STACK.md). Called where the model is loaded, so each actor chooses for its own hardware."""
    if dtype != "auto":
        return dtype
    import torch

    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    capabilities = torch.cpu.get_capabilities()
    return "bfloat16" if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else "float32"


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type, or out of range."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Builds ``cls`` from an optional YAML file and ``key.sub=value`` overrides, then validates.

    Args:
        cls: The root config dataclass.
        path: A YAML file whose mapping mirrors ``cls``; missing keys keep their defaults.
        overrides: Strings like ``"learner.sft.epochs=2"``; values are parsed as YAML.

    Raises:
        ConfigError: On unknown keys, wrong types, or a failed ``validate()``.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    for item in overrides or []:
        _apply_override(data, item)
    return from_dict(cls, data)


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Builds and validates a config dataclass from a plain mapping."""
    config = _build(cls, data, where)
    validate(config)
    return config


def with_sections(cls: type[T], sections: dict[str, type]) -> type[T]:
    """A subclass of the config dataclass ``cls`` with one more field per section, each
    defaulting to its dataclass's defaults (how an experiment composes what is registered).

    Raises:
        ValueError: When a section's name is a field of ``cls`` already.
    """
    taken = {f.name for f in dataclasses.fields(cls)} & set(sections)
    if taken:
        raise ValueError(f"config sections {sorted(taken)} clash with fields of {cls.__name__}")
    fields = [(name, kind, dataclasses.field(default_factory=kind)) for name, kind in sections.items()]
    made = dataclasses.make_dataclass(cls.__name__, fields, bases=(cls,))
    made.__module__, made.__qualname__, made.__doc__ = cls.__module__, cls.__qualname__, cls.__doc__
    return made


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for YAML dumps and logs)."""
    return dataclasses.asdict(config)


def validate(config: Any, where: str = "") -> None:
    """Calls ``validate()`` on ``config`` and every nested config, naming the failing key."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{where}{f.name}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    validate(item, f"{where}{f.name}[{i}].")
    check = getattr(config, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{where}{e}" if where else str(e)) from None


def _apply_override(data: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def _build(cls: type[T], data: Any, where: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + u for u in unknown)}; known: {sorted(names)}")
    data = dict(data)
    for f in dataclasses.fields(cls):
        # A section given in part keeps the rest of *this* field's default, not its class's:
        # ``sft.epochs=1`` must not reset an ``sft`` section the parent built with its own values.
        if f.name in data and isinstance(data[f.name], dict) and dataclasses.is_dataclass(hints[f.name]):
            if f.default_factory is not dataclasses.MISSING:
                data[f.name] = _merge(dataclasses.asdict(f.default_factory()), data[f.name])
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Path and isinstance(value, str):
        return Path(value)
    if isinstance(hint, type) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value
