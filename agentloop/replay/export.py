"""Trajectories and pairs out of a replay store and into one, in the formats other agent-tuning tools read.

Three file formats (:data:`Format`), each holding one record per trajectory or pair:

- ``eto``: a JSON list of ``{"id", "conversations": [{"from": "human" | "gpt", "value"}]}``, as
  ETO's released SFT data, AgentInstruct and FastChat's trainers have it (one record per line).
- ``chat``: JSON lines of ``{"id", "messages": [{"role": "user" | "assistant", "content"}]}``,
  OpenAI's chat form, which TRL's trainers take as conversational data.
- ``dataset``: one Parquet file that ``datasets.load_dataset("parquet", data_files=...)`` reads,
  with the ``chat`` records' columns and explicit types (:func:`trajectory_features`). Parquet
  rather than ``save_to_disk``: ``load_dataset`` reads it (a ``save_to_disk`` directory needs
  ``load_from_disk``), so do pandas, polars and the Hub viewer; it keeps int64 token ids and
  float64 log-probs exactly, and the types travel in the file.

A pair's record is TRL's conversational preference form, ``{"id", "prompt", "chosen",
"rejected"}`` (ETO's own pair files have the same keys, with ``from``/``value`` messages): the
prompt is the messages both sides share, up to the last user message before the first
difference, so each side starts with an assistant turn, as TRL's DPO trainer (which renders the
prompt with a generation prompt) and ETO expect.

The conversation (``conversations``, ``messages``, ``prompt``/``chosen``/``rejected``) is what
foreign tools train on, and it is the conversation agentloop's learner trains on by default: the
first message without the memory the episode was shown (see :attr:`Trajectory.memory`). Every
record also carries an ``agentloop`` object (a struct column in the dataset) holding the rest of
the record: the task, every scalar field of :class:`~agentloop.types.Trajectory`, and per
message its ``token_ids``, ``logprobs`` and ``policy_version``, aligned with the conversation.
Importing a file agentloop wrote therefore gives back records equal to the exported ones.

A record without ``agentloop`` fields (ETO's or AgentInstruct's released trajectories) imports
as an expert demonstration (:func:`read_trajectories`). Reading checks every record first and
names the file, the record and what is wrong; an import then stores everything as one completed
stage, in one transaction, or nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import reprlib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar, Unpack

from agentloop.replay.store import ReplayStore, TrajectoryFilter
from agentloop.types import Message, Pair, Role, Task, Trajectory

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

T = TypeVar("T")

Format = Literal["eto", "chat", "dataset"]
"""How an export is written: ETO's conversation JSON, chat JSON lines, or a Parquet dataset."""

FORMATS: tuple[Format, ...] = typing.get_args(Format)

IMPORTED_KIND = "imported"
"""The task kind of a demonstration imported without one."""

EXPERT_VERSION = -1
"""The ``policy_version`` of an imported demonstration (experts act as version -1)."""

_FIELDS = typing.get_type_hints(Trajectory)
_SCALARS = {f.name: _FIELDS[f.name] for f in dataclasses.fields(Trajectory) if f.name not in ("task", "messages")}
"""Trajectory fields written as they are, with their types."""
_DEFAULTED = {f.name for f in dataclasses.fields(Trajectory) if f.default is not dataclasses.MISSING}
"""Fields a record may lack (older exports): they take the dataclass default."""
_COUNTS = ("num_turns", "invalid_actions", "generated_tokens", "tamper_attempts", "trial")
_TASK_KEYS = tuple(f.name for f in dataclasses.fields(Task))
_MESSAGE_KEYS = ("token_ids", "logprobs", "policy_version")
_PAIR_KEYS = ("iteration", "chosen", "rejected")


class FormatError(ValueError):
    """A file or one of its records is not in the format it was read as; the message names both."""


class _Invalid(Exception):
    """What is wrong with one record (raised inside a record, named with its file and place by the reader)."""


class PairFilter(TypedDict, total=False):
    """Filters on stored pairs: the iteration that built them and their task; ``None`` matches everything."""

    iteration: int | None
    env: str | None
    task_id: str | None
    split: str | None
    kind: str | None


@dataclass(frozen=True)
class _Style:
    """How a format spells a conversation's messages."""

    key: str
    """The record's conversation key."""
    role: str
    """A message's role key."""
    text: str
    """A message's text key."""
    names: Mapping[Role, str]
    """Each role's name."""

    def message(self, role: Role, text: str) -> dict[str, str]:
        return {self.role: self.names[role], self.text: text}


_ETO = _Style("conversations", "from", "value", {"user": "human", "assistant": "gpt"})
_CHAT = _Style("messages", "role", "content", {"user": "user", "assistant": "assistant"})
_STYLES: dict[Format, _Style] = {"eto": _ETO, "chat": _CHAT, "dataset": _CHAT}


# Writing


def export_trajectories(store: ReplayStore, path: str | Path, fmt: Format, **filters: Unpack[TrajectoryFilter]) -> int:
    """Writes the stored trajectories matching ``filters`` (oldest first) to ``path``.

    Returns:
        The number of trajectories written.
    """
    count = write_trajectories(store.trajectories(**filters), path, fmt)
    logger.info("exported %d trajectories to %s (%s)", count, path, fmt)
    return count


def export_pairs(store: ReplayStore, path: str | Path, fmt: Format, **filters: Unpack[PairFilter]) -> int:
    """Writes the stored pairs matching ``filters`` (oldest first) to ``path``, in TRL's preference form.

    Returns:
        The number of pairs written.

    Raises:
        TypeError: If a filter is not one of :class:`PairFilter`'s.
    """
    unknown = sorted(set(filters) - set(PairFilter.__annotations__))
    if unknown:
        raise TypeError(f"unknown pair filter(s) {unknown}; known: {list(PairFilter.__annotations__)}")
    on_task = {name: value for name, value in filters.items() if name != "iteration" and value is not None}
    pairs = [
        p for p in store.pairs(filters.get("iteration")) if all(getattr(p.task, k) == v for k, v in on_task.items())
    ]
    count = write_pairs(pairs, path, fmt)
    logger.info("exported %d pairs to %s (%s)", count, path, fmt)
    return count


def write_trajectories(trajectories: Iterable[Trajectory], path: str | Path, fmt: Format) -> int:
    """Writes trajectories to ``path`` (replacing it whole, or leaving it as it was on error).

    Returns:
        The number of trajectories written.

    Raises:
        ValueError: If a trajectory cannot be written (see :func:`trajectory_record`, and JSON
            has no NaN or infinity).
    """
    records = [trajectory_record(t, fmt) for t in trajectories]
    _write(records, Path(path), fmt, trajectory_features)
    return len(records)


def write_pairs(pairs: Iterable[Pair], path: str | Path, fmt: Format) -> int:
    """Writes pairs to ``path`` in TRL's preference form (see :func:`pair_record`).

    Returns:
        The number of pairs written.
    """
    records = [pair_record(p, fmt) for p in pairs]
    _write(records, Path(path), fmt, pair_features)
    return len(records)


def trajectory_record(trajectory: Trajectory, fmt: Format) -> dict[str, Any]:
    """The record of a trajectory: its task id, its conversation in ``fmt``'s spelling, and its ``agentloop`` fields.

    Raises:
        ValueError: If the trajectory's first message does not start with its memory.
    """
    style = _STYLES[fmt]
    shown = [style.message(role, text) for role, text in _shown(trajectory)]
    return {"id": trajectory.task.task_id, style.key: shown, "agentloop": _fields(trajectory)}


def pair_record(pair: Pair, fmt: Format) -> dict[str, Any]:
    """TRL's conversational preference record of a pair: shared ``prompt``, then ``chosen`` and ``rejected``.

    Raises:
        ValueError: If the two sides share no first message, or one has nothing after the prompt.
    """
    style = _STYLES[fmt]
    chosen, rejected = _shown(pair.chosen), _shown(pair.rejected)
    n = _prompt_length(chosen, rejected)
    if n == 0 or n in (len(chosen), len(rejected)):
        raise ValueError(
            f"pair of task {pair.task.key} (iteration {pair.iteration}): its sides share {n} messages of "
            f"{len(chosen)} and {len(rejected)}; TRL's preference form needs a shared prompt and two completions"
        )
    return {
        "id": pair.task.task_id,
        "prompt": [style.message(*m) for m in chosen[:n]],
        "chosen": [style.message(*m) for m in chosen[n:]],
        "rejected": [style.message(*m) for m in rejected[n:]],
        "agentloop": {"iteration": pair.iteration, "chosen": _fields(pair.chosen), "rejected": _fields(pair.rejected)},
    }


def trajectory_features(fmt: Format) -> datasets.Features:
    """The column types of trajectory records in ``fmt`` (pass them to ``load_dataset`` for the JSON formats:
    inferred types break on large files whose first rows hold only empty or null values)."""
    from datasets import Features, Value

    return Features({"id": Value("string"), _STYLES[fmt].key: _conversation_type(fmt), "agentloop": _trajectory_type()})


def pair_features(fmt: Format) -> datasets.Features:
    """The column types of pair records in ``fmt`` (see :func:`trajectory_features`)."""
    from datasets import Features, Value

    pair = {"iteration": Value("int64"), "chosen": _trajectory_type(), "rejected": _trajectory_type()}
    sides = {key: _conversation_type(fmt) for key in ("prompt", "chosen", "rejected")}
    return Features({"id": Value("string"), **sides, "agentloop": pair})


def _conversation_type(fmt: Format) -> Any:
    from datasets import List, Value

    style = _STYLES[fmt]
    return List({style.role: Value("string"), style.text: Value("string")})


def _trajectory_type() -> dict[str, Any]:
    from datasets import List, Value

    names = {str: "string", bool: "bool", int: "int64", float: "float64"}
    scalars = {k: Value("string" if typing.get_origin(t) is Literal else names[t]) for k, t in _SCALARS.items()}
    message = {"token_ids": List(Value("int64")), "logprobs": List(Value("float64")), "policy_version": Value("int64")}
    return {"task": {k: Value("string") for k in _TASK_KEYS}, **scalars, "messages": List(message)}


def _shown(trajectory: Trajectory) -> list[tuple[Role, str]]:
    """The conversation as exported: roles and text, the first message without the episode's memory."""
    shown = [(m.role, m.content) for m in trajectory.messages]
    memory = trajectory.memory
    if memory:
        if not shown or not shown[0][1].startswith(memory):
            raise ValueError(f"{trajectory.task.key}: the first message does not start with the episode's memory")
        shown[0] = (shown[0][0], shown[0][1][len(memory) :])
    return shown


def _prompt_length(chosen: Sequence[tuple[Role, str]], rejected: Sequence[tuple[Role, str]]) -> int:
    """Messages both sides share, cut back so the prompt ends on a user message."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n and chosen[n - 1][0] == "assistant":
        n -= 1
    return n


def _fields(t: Trajectory) -> dict[str, Any]:
    """The ``agentloop`` object of a trajectory: everything its conversation does not show."""
    messages = [
        {"token_ids": list(m.token_ids), "logprobs": list(m.logprobs), "policy_version": m.policy_version}
        for m in t.messages
    ]
    return {"task": dataclasses.asdict(t.task), **{k: getattr(t, k) for k in _SCALARS}, "messages": messages}


def _write(
    records: list[dict[str, Any]], path: Path, fmt: Format, features: Callable[[Format], datasets.Features]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dataset":
        from datasets import Dataset

        types = features(fmt)
        table = Dataset.from_dict({name: [r[name] for r in records] for name in types}, features=types)  # 0 rows too
        _replace(path, lambda tmp: table.to_parquet(str(tmp)))
        return
    lines = [_json(record, path, i) for i, record in enumerate(records)]
    text = "[\n" + ",\n".join(lines) + "\n]\n" if fmt == "eto" else "".join(line + "\n" for line in lines)
    _replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json(record: dict[str, Any], path: Path, index: int) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise ValueError(
            f"{path}: record {index} (id {record['id']!r}): {e}; JSON has no NaN or infinity, use the dataset format"
        ) from e


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """Writes ``path`` through a file beside it, renamed at the end: a failed export leaves no partial file."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# Reading


def import_trajectories(
    store: ReplayStore,
    path: str | Path,
    fmt: Format,
    *,
    stage: str,
    env: str | None = None,
    kind: str = IMPORTED_KIND,
) -> list[Trajectory]:
    """Reads trajectories (see :func:`read_trajectories`) and stores them as the completed stage ``stage``.

    Everything is read and checked before anything is stored, and the stage is committed in
    one transaction: the store gets every trajectory of the file, or none.

    Returns:
        The trajectories stored, in file order.

    Raises:
        FormatError: If the file or a record is malformed.
        ValueError: If ``stage`` is complete already.
    """
    trajectories = read_trajectories(path, fmt, env=env, kind=kind)
    store.commit_stage(stage, trajectories=trajectories, metrics={"import/trajectories": len(trajectories)})
    logger.info("imported %d trajectories from %s as stage %s", len(trajectories), path, stage)
    return trajectories


def import_pairs(store: ReplayStore, path: str | Path, fmt: Format, *, stage: str) -> list[Pair]:
    """Reads pairs agentloop exported (see :func:`read_pairs`) and stores them as the completed stage ``stage``.

    Their trajectories are matched against the stored ones (see :mod:`agentloop.replay.store`):
    trajectories imported before are referenced, the others are stored with ``stage``. All or nothing.

    Returns:
        The pairs stored, in file order.

    Raises:
        FormatError: If the file or a record is malformed.
        ValueError: If ``stage`` is complete already.
    """
    pairs = read_pairs(path, fmt)
    store.commit_stage(stage, pairs=pairs, metrics={"import/pairs": len(pairs)})
    logger.info("imported %d pairs from %s as stage %s", len(pairs), path, stage)
    return pairs


def read_trajectories(
    path: str | Path, fmt: Format, *, env: str | None = None, kind: str = IMPORTED_KIND
) -> list[Trajectory]:
    """Reads every trajectory record of a file, in order.

    A record holds its conversation under ``conversations`` (``from``/``value`` messages) or
    ``messages`` (``role``/``content``), in any of the formats. A record with ``agentloop``
    fields becomes the trajectory agentloop exported. A record without them (ETO's and
    AgentInstruct's released trajectories) becomes an expert demonstration whose messages were
    never tokenized (``tokenizer`` ``""``, empty ``token_ids``): the task ``id`` of ``env``,
    split ``train``, kind ``kind``, with the first user message as its instruction (in ETO's
    and AgentInstruct's data the environment's shared instructions; the task's own goal comes
    in a later message). It counts as solved: reward 1.0 unless the record gives a ``reward``
    (ETO's WebShop data does), success when the reward is 1.0 or more. Its messages must
    alternate from a user message and hold an assistant turn; keys such as AgentInstruct's
    ``loss`` are ignored (the learner trains on every assistant turn).

    Args:
        path: The file.
        fmt: Its format.
        env: The environment foreign records are demonstrations for (required for them).
        kind: The task kind given to foreign records.

    Raises:
        FormatError: If the file or any record is malformed, naming the file, the record and the problem.
        FileNotFoundError: If there is no file at ``path``.
    """
    path = Path(path)
    return _parse(path, _records(path, fmt), lambda record: _trajectory(record, env, kind))


def read_pairs(path: str | Path, fmt: Format) -> list[Pair]:
    """Reads every pair record of a file agentloop wrote (:func:`write_pairs`), in order.

    Raises:
        FormatError: If the file or any record is malformed (or has no ``agentloop`` fields).
        FileNotFoundError: If there is no file at ``path``.
    """
    path = Path(path)
    return _parse(path, _records(path, fmt), _pair)


def _records(path: Path, fmt: Format) -> list[tuple[str, Any]]:
    """The file's records, each with where it is (``record 3``, ``line 4``, ``row 2``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "dataset":
        return [(f"row {i}", row) for i, row in enumerate(_parquet_rows(path))]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text: {e}") from e
    if fmt == "eto":
        found = _loads(text, f"{path}")
        if not isinstance(found, list):
            raise FormatError(f"{path}: expected a JSON list of records, found a JSON {type(found).__name__}")
        return [(f"record {i}", record) for i, record in enumerate(found)]
    lines = enumerate(text.split("\n"), start=1)  # not splitlines(): JSON strings may hold U+2028
    return [(f"line {n}", _loads(line, f"{path}: line {n}")) for n, line in lines if line.strip()]


def _loads(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{where}: not valid JSON: {e}") from e


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a Parquet file, read with pyarrow (the reader under ``datasets``; ``load_dataset`` itself
    fails on a file of zero rows and writes a cache)."""
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as e:
        raise FormatError(f"{path}: not a readable Parquet file: {e}") from e


def _parse(path: Path, records: list[tuple[str, Any]], parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """Every record parsed, or a :class:`FormatError` naming the file and the first bad record."""
    parsed = []
    for where, record in records:
        try:
            if not isinstance(record, dict):
                raise _Invalid(f"is a JSON {type(record).__name__}, not an object")
            parsed.append(parse(record))
        except _Invalid as e:
            named = f" (id {_short(record['id'])})" if isinstance(record, dict) and record.get("id") is not None else ""
            raise FormatError(f"{path}: {where}{named}: {e}") from None
    return parsed


def _trajectory(record: dict[str, Any], env: str | None, kind: str) -> Trajectory:
    keys = [k for k in ("conversations", "messages") if record.get(k) is not None]
    if len(keys) != 1:
        raise _Invalid(
            "has both 'conversations' and 'messages'" if keys else "has neither 'conversations' nor 'messages'"
        )
    turns = _turns(record[keys[0]], keys[0])
    if record.get("agentloop") is None:
        return _demonstration(record, turns, env, kind)
    return _exported(turns, record["agentloop"], "agentloop")


def _pair(record: dict[str, Any]) -> Pair:
    if record.get("agentloop") is None:
        raise _Invalid("has no 'agentloop' fields: only pairs agentloop exported can be imported")
    fields = _object(record["agentloop"], "agentloop", _PAIR_KEYS)
    prompt, chosen, rejected = (_turns(record.get(key), key) for key in ("prompt", "chosen", "rejected"))
    sides = [
        _exported(prompt + side, fields[key], f"agentloop.{key}")
        for side, key in ((chosen, "chosen"), (rejected, "rejected"))
    ]
    if sides[0].task != sides[1].task:
        raise _Invalid(f"its sides attempt different tasks: {sides[0].task.key} and {sides[1].task.key}")
    iteration = _typed(fields["iteration"], int, "agentloop.iteration")
    return Pair(task=sides[0].task, chosen=sides[0], rejected=sides[1], iteration=iteration)


def _turns(messages: Any, name: str) -> list[tuple[Role, str]]:
    """A conversation's roles and texts; each message is spelled ``from``/``value`` or ``role``/``content``."""
    return [_turn(m, f"{name}[{i}]") for i, m in enumerate(_list(messages, name))]


def _turn(message: Any, name: str) -> tuple[Role, str]:
    if not isinstance(message, dict):
        raise _Invalid(f"{name} is {_short(message)}, not an object")
    for style in (_ETO, _CHAT):
        spelled = message.get(style.role)
        if spelled is None:
            continue
        roles = {v: k for k, v in style.names.items()}
        if spelled not in roles:
            raise _Invalid(f"{name} has {style.role} {_short(spelled)}; expected one of {sorted(roles)}")
        text = message.get(style.text)
        if not isinstance(text, str):
            raise _Invalid(f"{name} has {style.text} {_short(text)}, not a string")
        return roles[spelled], text
    raise _Invalid(f"{name} has neither 'from' nor 'role'")


def _demonstration(record: dict[str, Any], turns: list[tuple[Role, str]], env: str | None, kind: str) -> Trajectory:
    """A foreign record as an expert demonstration, never tokenized (see :func:`read_trajectories`)."""
    if env is None:
        raise _Invalid("has no 'agentloop' fields; give the env to import it as a demonstration")
    task_id = record.get("id")
    if isinstance(task_id, bool) or not isinstance(task_id, str | int) or task_id == "":
        raise _Invalid(f"has id {_short(task_id)}; a demonstration needs the id of its task")
    _check_dialogue(turns)
    reward = 1.0 if record.get("reward") is None else _typed(record["reward"], float, "reward")
    return Trajectory(
        task=Task(env=env, task_id=str(task_id), split="train", kind=kind, instruction=turns[0][1]),
        messages=tuple(Message(role, text) for role, text in turns),
        tokenizer="",
        reward=reward,
        success=reward >= 1.0,
        terminated=True,
        truncated=False,
        num_turns=sum(role == "assistant" for role, _ in turns),
        invalid_actions=0,
        source="expert",
        policy_version=EXPERT_VERSION,
        iteration=0,
    )


def _check_dialogue(turns: list[tuple[Role, str]]) -> None:
    """A demonstration alternates user and assistant messages from a user message, with one assistant turn at least."""
    if len(turns) < 2:
        raise _Invalid(f"has {len(turns)} messages; a demonstration needs a user message and an assistant turn")
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise _Invalid(f"message {i} is the {role}'s where the {expected}'s is due (turns must alternate)")


def _exported(turns: list[tuple[Role, str]], fields: Any, name: str) -> Trajectory:
    """The trajectory agentloop exported as ``turns`` and its ``agentloop`` fields."""
    obj = _object(fields, name, ("task", "messages", *_SCALARS), optional=_DEFAULTED)
    task = _object(obj["task"], f"{name}.task", _TASK_KEYS)
    extras = _list(obj["messages"], f"{name}.messages")
    if len(extras) != len(turns):
        raise _Invalid(f"{name}.messages holds {len(extras)} entries for a conversation of {len(turns)} messages")
    aligned = enumerate(zip(turns, extras, strict=True))
    messages = [_message(*turn, extra, f"{name}.messages[{i}]") for i, (turn, extra) in aligned]
    scalars = {k: _typed(obj[k], _SCALARS[k], f"{name}.{k}") for k in _SCALARS if k in obj}
    negative = [k for k in _COUNTS if scalars.get(k, 0) < 0]
    if negative:
        raise _Invalid(f"{name} has negative {negative}")
    memory = scalars.get("memory", "")
    if memory and messages:
        messages[0] = dataclasses.replace(messages[0], content=memory + messages[0].content)
    elif memory:
        raise _Invalid(f"{name} has memory but no messages to show it in")
    return Trajectory(
        task=Task(**{k: _typed(task[k], str, f"{name}.task.{k}") for k in _TASK_KEYS}),
        messages=tuple(messages),
        **scalars,
    )


def _message(role: Role, text: str, extra: Any, name: str) -> Message:
    obj = _object(extra, name, _MESSAGE_KEYS)
    token_ids = tuple(_typed(t, int, f"{name}.token_ids") for t in _list(obj["token_ids"], f"{name}.token_ids"))
    logprobs = tuple(_typed(p, float, f"{name}.logprobs") for p in _list(obj["logprobs"], f"{name}.logprobs"))
    version = obj["policy_version"]
    version = None if version is None else _typed(version, int, f"{name}.policy_version")
    return Message(role, text, token_ids, logprobs, version)


def _object(value: Any, name: str, required: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """``value`` as an object holding every required key, and no key besides those and the optional ones."""
    if not isinstance(value, dict):
        raise _Invalid(f"{name} is {_short(value)}, not an object")
    required, allowed = set(required) - set(optional), set(required) | set(optional)
    missing, unknown = sorted(required - value.keys()), sorted(value.keys() - allowed)
    if missing:
        raise _Invalid(f"{name} lacks {missing}")
    if unknown:
        raise _Invalid(f"{name} has unknown keys {unknown}")
    return value


def _list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise _Invalid(f"{name} is {_short(value)}, not a list")
    return value


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` if it is of type ``hint`` (a float may be written as an integer); else :class:`_Invalid`."""
    if typing.get_origin(hint) is Literal:
        ok, wanted = value in typing.get_args(hint), f"one of {list(typing.get_args(hint))}"
    elif hint is float:
        ok, wanted = isinstance(value, int | float) and not isinstance(value, bool), "a number"
        value = float(value) if ok else value
    elif hint is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, wanted = isinstance(value, hint), f"a {hint.__name__}"
    if not ok:
        raise _Invalid(f"{name} is {_short(value)}, not {wanted}")
    return value


def _short(value: Any) -> str:
    return reprlib.repr(value)
