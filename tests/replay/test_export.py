"""Export and import of trajectories and pairs: real stores, real files, the real ``datasets`` loader."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import pytest

from agentloop.replay import (
    FORMATS,
    FormatError,
    ReplayStore,
    export_pairs,
    export_trajectories,
    import_pairs,
    import_trajectories,
    read_trajectories,
    write_trajectories,
)
from agentloop.replay.export import pair_features, pair_record, trajectory_features, trajectory_record
from agentloop.types import Message, Pair, Task, Trajectory

COUNT = Task(env="db", task_id="train-1", split="train", kind="SELECT", instruction="How many rows?")
KITCHEN = Task(env="alfworld", task_id="pick-1", split="train", kind="pick_and_place", instruction="Put a mug away.")
MEMORY = "Earlier trial: «SELECT 2» was wrong.\n\n"


def user(text: str, ids: tuple[int, ...] = ()) -> Message:
    return Message("user", text, ids)


def assistant(text: str, ids: tuple[int, ...] = (), version: int | None = None) -> Message:
    logprobs = tuple(-0.1 * (k + 1) - 1e-9 for k in range(len(ids))) if version is not None else ()
    return Message("assistant", text, ids, logprobs, version)


def trajectory(task: Task, messages: list[Message], **fields: Any) -> Trajectory:
    """An explored trajectory of ``task``, its fields overridden by ``fields``."""
    defaults = dict(
        tokenizer="gemma:0123456789abcdef",
        reward=1.0,
        success=True,
        terminated=True,
        truncated=False,
        num_turns=sum(m.role == "assistant" for m in messages),
        invalid_actions=0,
        source="explore",
        policy_version=1,
        iteration=1,
    )
    return Trajectory(task=task, messages=tuple(messages), **{**defaults, **fields})  # type: ignore[arg-type]


def expert() -> Trajectory:
    """A demonstration as :func:`agentloop.envs.experts.replay_actions` records one: no tokens."""
    messages = [user("Task: how many rows?"), assistant("SELECT COUNT(*) FROM t;"), user("[(3,)]"), assistant("3")]
    return trajectory(COUNT, messages, tokenizer="", source="expert", policy_version=-1, iteration=0)


def explored() -> Trajectory:
    """A failed exploration shown memory, every field away from its default."""
    messages = [
        user(MEMORY + "Task: how many rows?", (2, 10, 11, 12)),
        assistant("SELECT 2;", (20, 21, 1), version=3),
        user('[(2,)]\u2028"quoted"\n', (30, 31)),
        assistant("Answer: 2 ✓", (40, 1), version=3),
    ]
    fields = dict(reward=0.1 + 0.2, success=False, terminated=False, truncated=True, invalid_actions=1)
    more = dict(generated_tokens=5, tamper_attempts=2, trial=1, memory=MEMORY, reflection="Count, don't guess.")
    return trajectory(COUNT, messages, policy_version=3, iteration=2, **fields, **more)


def lone_observation() -> Trajectory:
    """An episode cut before the policy said anything."""
    return trajectory(KITCHEN, [user("You are in a kitchen.", (5, 6))], success=False, reward=0.0, num_turns=0)


def batch() -> list[Trajectory]:
    return [expert(), explored(), lone_observation()]


@pytest.fixture
def store(store_url: str) -> Iterator[ReplayStore]:
    replay = ReplayStore(store_url)
    yield replay
    replay.close()


@pytest.fixture
def other(other_store_url: str) -> Iterator[ReplayStore]:
    replay = ReplayStore(other_store_url)
    yield replay
    replay.close()


def load(path: Path, fmt: str, tmp_path: Path, features: datasets.Features | None = None) -> list[dict]:
    """Rows of an exported file as ``datasets.load_dataset`` reads them (offline, local files)."""
    builder = "parquet" if fmt == "dataset" else "json"
    found = datasets.load_dataset(
        builder, data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"), features=features
    )
    return found.to_list()


def close(found: Any, expected: Any) -> bool:
    """Equal, but for floats that may differ in their last digits."""
    if isinstance(expected, float):
        return found == pytest.approx(expected, rel=1e-15)
    if isinstance(expected, dict):
        return found.keys() == expected.keys() and all(close(found[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return len(found) == len(expected) and all(close(f, e) for f, e in zip(found, expected, strict=True))
    return found == expected


def test_the_batch_sets_every_defaulted_field() -> None:
    """The round trips below would miss a field left at its default in every trajectory."""
    for field in dataclasses.fields(Trajectory):
        if field.default is not dataclasses.MISSING:
            assert any(getattr(t, field.name) != field.default for t in batch()), field.name


@pytest.mark.parametrize("fmt", FORMATS)
def test_trajectories_round_trip_exactly(store: ReplayStore, other: ReplayStore, tmp_path: Path, fmt: str) -> None:
    store.commit_stage("explore/1", trajectories=batch(), metrics={})
    path = tmp_path / f"out.{fmt}"
    assert export_trajectories(store, path, fmt) == 3  # type: ignore[arg-type]
    imported = import_trajectories(other, path, fmt, stage="import/1")  # type: ignore[arg-type]
    assert imported == batch() == store.trajectories() == other.trajectories(stage="import/1")
    assert other.completed_stages() == ["import/1"]
    assert other.stage_metrics("import/1") == {"import/trajectories": 3.0}
    assert other.trajectories()[1].messages[0].content.startswith(MEMORY)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exports_follow_the_store_filters(store: ReplayStore, tmp_path: Path, fmt: str) -> None:
    store.commit_stage("explore/1", trajectories=batch(), metrics={})
    path = tmp_path / f"out.{fmt}"
    assert export_trajectories(store, path, fmt, source="expert") == 1  # type: ignore[arg-type]
    assert read_trajectories(path, fmt) == [expert()]  # type: ignore[arg-type]
    assert export_trajectories(store, path, fmt, env="db", success=False, trial=1) == 1  # type: ignore[arg-type]
    assert read_trajectories(path, fmt) == [explored()]  # type: ignore[arg-type]
    assert export_trajectories(store, path, fmt, stage="explore/2") == 0  # type: ignore[arg-type]
    assert read_trajectories(path, fmt) == []  # type: ignore[arg-type]


def test_an_eto_record_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "eto.json"
    write_trajectories([explored()], path, "eto")
    (record,) = json.loads(path.read_text(encoding="utf-8"))
    assert record["id"] == "train-1"
    assert record["conversations"] == [  # the first message without the memory, as the learner trains on it
        {"from": "human", "value": "Task: how many rows?"},
        {"from": "gpt", "value": "SELECT 2;"},
        {"from": "human", "value": '[(2,)]\u2028"quoted"\n'},
        {"from": "gpt", "value": "Answer: 2 ✓"},
    ]
    fields = record["agentloop"]
    assert fields["task"] == {
        "env": "db",
        "task_id": "train-1",
        "split": "train",
        "kind": "SELECT",
        "instruction": "How many rows?",
    }
    assert fields["messages"][1] == {
        "token_ids": [20, 21, 1],
        "logprobs": [-0.1 - 1e-9, -0.2 - 1e-9, -0.30000000000000004 - 1e-9],
        "policy_version": 3,
    }
    assert fields["messages"][0] == {"token_ids": [2, 10, 11, 12], "logprobs": [], "policy_version": None}
    assert fields["reward"] == 0.30000000000000004 and fields["memory"] == MEMORY and fields["trial"] == 1
    assert path.read_text(encoding="utf-8").count("\n") == 3  # "[", one line per record, "]"


def test_a_chat_line_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    write_trajectories([expert(), lone_observation()], path, "chat")
    first, second = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines())
    assert first["messages"] == [
        {"role": "user", "content": "Task: how many rows?"},
        {"role": "assistant", "content": "SELECT COUNT(*) FROM t;"},
        {"role": "user", "content": "[(3,)]"},
        {"role": "assistant", "content": "3"},
    ]
    assert first["agentloop"]["tokenizer"] == "" and first["agentloop"]["source"] == "expert"
    assert second == {
        "id": "pick-1",
        "messages": [{"role": "user", "content": "You are in a kitchen."}],
        "agentloop": second["agentloop"],
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_datasets_loads_trajectory_exports(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"out.{fmt}"
    write_trajectories(batch(), path, fmt)  # type: ignore[arg-type]
    expected = [trajectory_record(t, fmt) for t in batch()]  # type: ignore[arg-type]
    rows = load(path, fmt, tmp_path, trajectory_features(fmt))  # type: ignore[arg-type]
    if fmt == "eto":  # datasets reads a JSON list through pandas, whose float parsing may drop the last digits
        assert close(rows, expected)
    else:
        assert rows == expected
    key = "conversations" if fmt == "eto" else "messages"
    inferred = load(path, fmt, tmp_path / "inferred")  # what a reader gets without agentloop's types
    assert [r[key] for r in inferred] == [r[key] for r in expected]
    assert [r["agentloop"]["messages"][1]["token_ids"] for r in inferred[:2]] == [[], [20, 21, 1]]


def test_the_dataset_keeps_its_types(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet"
    write_trajectories([expert()], path, "dataset")  # no logprobs, no versions: nothing to infer types from
    found = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    assert found.features == trajectory_features("dataset")
    assert found.features["agentloop"]["messages"].feature["token_ids"].feature.dtype == "int64"
    assert found.flatten()[0]["agentloop.reward"] == 1.0


def test_non_finite_numbers_need_the_dataset_format(tmp_path: Path) -> None:
    odd = replace(explored(), messages=(*explored().messages[:3], Message("assistant", "x", (7,), (-math.inf,), 3)))
    with pytest.raises(ValueError, match=r"out.jsonl: record 0 \(id 'train-1'\).*NaN or infinity"):
        write_trajectories([odd], tmp_path / "out.jsonl", "chat")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even half a file
    write_trajectories([odd], tmp_path / "out.parquet", "dataset")
    assert read_trajectories(tmp_path / "out.parquet", "dataset") == [odd]


# Pairs

C0 = [user("Task: how many rows?", (1, 2))]
CHOSEN = [*C0, assistant("SELECT COUNT(*) FROM t;", (3,), 1), user("[(3,)]", (4,)), assistant("Answer: 3", (5,), 1)]


def pairs_and_trajectories() -> tuple[list[Pair], list[Trajectory]]:
    """Three pairs of one task: sides that differ at the first action, after a shared action, and at an observation."""
    first = trajectory(COUNT, CHOSEN)
    wrong = trajectory(
        COUNT,
        [
            *C0,
            assistant("SELECT 2;", (6,), 1),
            user("[(2,)]", (7,)),
            assistant("Answer: 2", (8,), 1),
            user("Wrong.", (9,)),
        ],
        success=False,
        reward=0.0,
    )
    late = trajectory(COUNT, [*CHOSEN[:3], assistant("Answer: 4", (10,), 1)], reward=0.0, success=False, trial=1)
    other_view = trajectory(
        COUNT,
        [*CHOSEN[:2], user("[(4,)]", (11,)), assistant("Answer: 4", (10,), 1)],
        reward=0.5,
        success=False,
        trial=2,
    )
    cut = replace(wrong, messages=wrong.messages[:3], num_turns=1, terminated=False, truncated=True)
    remembered = replace(
        first, memory=MEMORY, messages=(replace(C0[0], content=MEMORY + C0[0].content), *CHOSEN[1:]), trial=3
    )
    pairs = [
        Pair(COUNT, first, cut, iteration=1),
        Pair(COUNT, first, late, iteration=1),
        Pair(COUNT, remembered, other_view, iteration=2),
    ]
    return pairs, [first, wrong, late, other_view, remembered]


def turns(fmt: str, *messages: tuple[str, str]) -> list[dict[str, str]]:
    """Messages as ``fmt`` spells them."""
    if fmt == "eto":
        return [{"from": {"user": "human", "assistant": "gpt"}[who], "value": text} for who, text in messages]
    return [{"role": who, "content": text} for who, text in messages]


def expected_pairs(fmt: str) -> list[dict[str, Any]]:
    """The TRL records of :func:`pairs_and_trajectories`, worked out by hand."""
    task = ("user", "Task: how many rows?")
    count, three = ("assistant", "SELECT COUNT(*) FROM t;"), ("user", "[(3,)]")
    return [
        {  # they differ at the first action: the prompt is the task, each side starts with its action
            "prompt": turns(fmt, task),
            "chosen": turns(fmt, count, three, ("assistant", "Answer: 3")),
            "rejected": turns(fmt, ("assistant", "SELECT 2;"), ("user", "[(2,)]")),
        },
        {  # a shared action and observation join the prompt
            "prompt": turns(fmt, task, count, three),
            "chosen": turns(fmt, ("assistant", "Answer: 3")),
            "rejected": turns(fmt, ("assistant", "Answer: 4")),
        },
        {  # the same action saw different observations: the prompt stops before the action; memory is not shown
            "prompt": turns(fmt, task),
            "chosen": turns(fmt, count, three, ("assistant", "Answer: 3")),
            "rejected": turns(fmt, count, ("user", "[(4,)]"), ("assistant", "Answer: 4")),
        },
    ]


def commit_pairs(store: ReplayStore) -> list[Pair]:
    pairs, trajectories = pairs_and_trajectories()
    store.commit_stage("explore/1", trajectories=trajectories, metrics={})
    store.commit_stage("pairs/1", pairs=pairs, metrics={})
    assert store.pairs() == pairs
    return pairs


@pytest.mark.parametrize("fmt", FORMATS)
def test_pair_records_are_trl_preference_records(fmt: str) -> None:
    pairs, _ = pairs_and_trajectories()
    for pair, expected in zip(pairs, expected_pairs(fmt), strict=True):
        record = pair_record(pair, fmt)  # type: ignore[arg-type]
        assert {k: record[k] for k in ("prompt", "chosen", "rejected")} == expected
        assert record["id"] == "train-1" and record["agentloop"]["iteration"] == pair.iteration


@pytest.mark.parametrize("fmt", FORMATS)
def test_pairs_round_trip_exactly(store: ReplayStore, other: ReplayStore, tmp_path: Path, fmt: str) -> None:
    stored = commit_pairs(store)
    path = tmp_path / f"pairs.{fmt}"
    assert export_pairs(store, path, fmt) == 3  # type: ignore[arg-type]
    rows = load(path, fmt, tmp_path, pair_features(fmt))  # type: ignore[arg-type]
    assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows] == expected_pairs(fmt)
    assert import_pairs(other, path, fmt, stage="import/pairs") == stored  # type: ignore[arg-type]
    assert other.pairs() == stored
    assert other.stage_metrics("import/pairs") == {"import/pairs": 3.0}


def test_imported_pairs_refer_to_imported_trajectories(store: ReplayStore, other: ReplayStore, tmp_path: Path) -> None:
    stored = commit_pairs(store)
    export_trajectories(store, tmp_path / "t.jsonl", "chat")
    export_pairs(store, tmp_path / "p.jsonl", "chat")
    import_trajectories(other, tmp_path / "t.jsonl", "chat", stage="import/trajectories")
    import_pairs(other, tmp_path / "p.jsonl", "chat", stage="import/pairs")
    assert other.pairs() == stored
    assert other.trajectories() == store.trajectories()  # the cut rejected side refers to its whole episode


def test_pair_exports_follow_filters(store: ReplayStore, tmp_path: Path) -> None:
    commit_pairs(store)
    path = tmp_path / "p.json"
    assert export_pairs(store, path, "eto", iteration=2) == 1
    assert export_pairs(store, path, "eto", env="db", kind="SELECT", iteration=1) == 2
    assert export_pairs(store, path, "eto", env="alfworld") == 0
    with pytest.raises(TypeError, match="unknown pair filter"):
        export_pairs(store, path, "eto", source="explore")  # type: ignore[call-arg]


def test_a_pair_without_a_shared_prompt_is_refused() -> None:
    pairs, _ = pairs_and_trajectories()
    odd = replace(pairs[0].rejected, messages=(user("Another first observation"), *pairs[0].rejected.messages[1:]))
    with pytest.raises(ValueError, match="share 0 messages"):
        pair_record(replace(pairs[0], rejected=odd), "chat")


# Foreign data

ETO_SFT = [  # as ETO's released SFT data: the environment's instructions, "OK", then the task
    {
        "id": "webshop_7",
        "conversations": [
            {"from": "human", "value": "You are web shopping.\nI will give you instructions."},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": "Observation: WebShop [SEP] Instruction: a red mug"},
            {"from": "gpt", "value": "Thought: search.\nAction: search[red mug]"},
        ],
        "reward": 0.75,
    },
    {
        "id": 8,
        "conversations": [
            {"from": "human", "value": "You are web shopping."},
            {"from": "gpt", "value": "Action: click[Buy Now]"},
        ],
    },
]

AGENT_INSTRUCT = [  # as AgentInstruct: a loss flag on every message
    {
        "id": "os_0",
        "conversations": [
            {"from": "human", "loss": False, "value": "You are an assistant that will act like a person."},
            {"from": "gpt", "loss": False, "value": "OK."},
            {"from": "human", "loss": False, "value": "Count the files in /etc."},
            {"from": "gpt", "loss": True, "value": "Act: bash\n\n```bash\nls /etc | wc -l\n```"},
            {"from": "human", "loss": None, "value": "The output of the OS:\n220"},
            {"from": "gpt", "loss": True, "value": "Act: answer(220)"},
        ],
    }
]


def demonstration(task_id: str, env: str, kind: str, turns: list[tuple[str, str]], reward: float = 1.0) -> Trajectory:
    """What an imported foreign record must become, written out field by field."""
    return Trajectory(
        task=Task(env=env, task_id=task_id, split="train", kind=kind, instruction=turns[0][1]),
        messages=tuple(Message(who, text) for who, text in turns),  # type: ignore[arg-type]
        tokenizer="",
        reward=reward,
        success=reward >= 1.0,
        terminated=True,
        truncated=False,
        num_turns=len(turns) // 2,
        invalid_actions=0,
        source="expert",
        policy_version=-1,
        iteration=0,
    )


def as_turns(record: dict[str, Any]) -> list[tuple[str, str]]:
    return [({"human": "user", "gpt": "assistant"}[m["from"]], m["value"]) for m in record["conversations"]]


def test_eto_sft_records_import_as_demonstrations(store: ReplayStore, tmp_path: Path) -> None:
    path = tmp_path / "webshop_sft.json"
    path.write_text(json.dumps(ETO_SFT, indent=4), encoding="utf-8")
    imported = import_trajectories(store, path, "eto", stage="experts", env="webshop")
    assert imported == [
        demonstration("webshop_7", "webshop", "imported", as_turns(ETO_SFT[0]), reward=0.75),
        demonstration("8", "webshop", "imported", as_turns(ETO_SFT[1])),
    ]
    assert imported[0].task.instruction == "You are web shopping.\nI will give you instructions."
    assert store.trajectories(stage="experts", source="expert") == imported
    assert all(not m.token_ids and not m.logprobs and m.policy_version is None for m in imported[0].messages)


@pytest.mark.parametrize("fmt", ["eto", "chat", "dataset"])
def test_agent_instruct_records_import_as_demonstrations(store: ReplayStore, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"os.{fmt}"
    if fmt == "eto":
        path.write_text(json.dumps(AGENT_INSTRUCT), encoding="utf-8")
    elif fmt == "chat":
        path.write_text("".join(json.dumps(r) + "\n" for r in AGENT_INSTRUCT), encoding="utf-8")
    else:  # as the Hub holds it: a Parquet file with a conversations column
        datasets.Dataset.from_list(AGENT_INSTRUCT).to_parquet(str(path))
    imported = import_trajectories(store, path, fmt, stage="experts", env="os", kind="bash")  # type: ignore[arg-type]
    assert imported == [demonstration("os_0", "os", "bash", as_turns(AGENT_INSTRUCT[0]))]
    assert imported[0].num_turns == 3 and imported[0].actions[-1] == "Act: answer(220)"
    assert store.trajectories() == imported


def test_openai_chat_lines_import_as_demonstrations(store: ReplayStore, tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    lines = [
        {
            "id": "dev-3",
            "messages": [{"role": "user", "content": "Which year?"}, {"role": "assistant", "content": "1999"}],
        }
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    imported = import_trajectories(store, path, "chat", stage="experts", env="db")
    assert imported == [demonstration("dev-3", "db", "imported", [("user", "Which year?"), ("assistant", "1999")])]


# Malformed input

GOOD = ETO_SFT[1]
EXPORTED = trajectory_record(explored(), "eto")


def with_fields(**changes: Any) -> dict[str, Any]:
    """The exported record of :func:`explored`, its ``agentloop`` fields changed."""
    return {**EXPORTED, "agentloop": {**EXPORTED["agentloop"], **changes}}


def with_message(**changes: Any) -> dict[str, Any]:
    extras = [dict(m) for m in EXPORTED["agentloop"]["messages"]]
    extras[1].update(changes)
    return with_fields(messages=extras)


BAD_RECORDS = {
    "not an object": (["just text"], r"record 1: is a JSON str, not an object"),
    "system role": (
        [{"id": "s", "conversations": [{"from": "system", "value": "Be brief."}]}],
        r"record 1 \(id 's'\): conversations\[0\] has from 'system'; expected one of \['gpt', 'human'\]",
    ),
    "no text": (
        [{"id": "s", "messages": [{"role": "user", "content": 3}]}],
        r"record 1 \(id 's'\): messages\[0\] has content 3, not a string",
    ),
    "no conversation": ([{"id": "s", "turns": []}], r"record 1 \(id 's'\): has neither 'conversations' nor 'messages'"),
    "two conversations": (
        [{"id": "s", "conversations": [], "messages": []}],
        r"record 1 \(id 's'\): has both 'conversations' and 'messages'",
    ),
    "no id": ([{"conversations": GOOD["conversations"]}], r"record 1: has id None; a demonstration needs the id"),
    "not alternating": (
        [{"id": "s", "conversations": [GOOD["conversations"][0]] * 2}],
        r"record 1 \(id 's'\): message 1 is the user's where the assistant's is due",
    ),
    "no action": (
        [{"id": "s", "conversations": GOOD["conversations"][:1]}],
        r"record 1 \(id 's'\): has 1 messages; a demonstration needs a user message and an assistant turn",
    ),
    "text reward": ([{**GOOD, "id": "s", "reward": "high"}], r"record 1 \(id 's'\): reward is 'high', not a number"),
    "token id": (
        [with_message(token_ids=[20, "x"])],
        r"record 1 \(id 'train-1'\): agentloop.messages\[1\].token_ids is 'x', not an integer",
    ),
    "misaligned": (
        [with_fields(messages=EXPORTED["agentloop"]["messages"][:3])],
        r"record 1 \(id 'train-1'\): agentloop.messages holds 3 entries for a conversation of 4 messages",
    ),
    "unknown field": ([with_fields(score=1)], r"record 1 \(id 'train-1'\): agentloop has unknown keys \['score'\]"),
    "missing field": (
        [{**EXPORTED, "agentloop": {k: v for k, v in EXPORTED["agentloop"].items() if k != "reward"}}],
        r"record 1 \(id 'train-1'\): agentloop lacks \['reward'\]",
    ),
    "bool as int": (
        [with_fields(num_turns=True)],
        r"record 1 \(id 'train-1'\): agentloop.num_turns is True, not an integer",
    ),
    "text as bool": (
        [with_fields(success="yes")],
        r"record 1 \(id 'train-1'\): agentloop.success is 'yes', not a bool",
    ),
    "source": (
        [with_fields(source="teacher")],
        r"record 1 \(id 'train-1'\): agentloop.source is 'teacher', not one of \['expert'",
    ),
    "negative trial": ([with_fields(trial=-1)], r"record 1 \(id 'train-1'\): agentloop has negative \['trial'\]"),
    "task": (
        [with_fields(task={"env": "db"})],
        r"record 1 \(id 'train-1'\): agentloop.task lacks \['instruction', 'kind', 'split', 'task_id'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_bad_record_is_named_and_nothing_is_stored(store: ReplayStore, tmp_path: Path, case: str) -> None:
    records, message = BAD_RECORDS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([GOOD, *records, GOOD]), encoding="utf-8")  # a good record first: all or nothing
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        import_trajectories(store, path, "eto", stage="experts", env="webshop")
    assert store.trajectories() == [] and store.completed_stages() == []


BAD_FILES = {
    "eto: not JSON": ("eto", '[{"id": 1,', r"not valid JSON: Expecting"),
    "eto: not a list": ("eto", '{"id": 1}', r"expected a JSON list of records, found a JSON dict"),
    "chat: a bad line": ("chat", json.dumps(GOOD) + "\n\n{oops\n", r"line 3: not valid JSON"),
    "chat: not UTF-8": ("chat", b"\xff\xfe{}", r"not UTF-8 text"),
    "dataset: not Parquet": ("dataset", "id,conversations\n1,x\n", r"not a readable Parquet file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_malformed_file_is_named_and_nothing_is_stored(store: ReplayStore, tmp_path: Path, case: str) -> None:
    fmt, content, message = BAD_FILES[case]
    path = tmp_path / "bad.file"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        import_trajectories(store, path, fmt, stage="experts", env="webshop")  # type: ignore[arg-type]
    assert store.trajectories() == [] and store.completed_stages() == []


def test_foreign_records_need_an_env(store: ReplayStore, tmp_path: Path) -> None:
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(ETO_SFT), encoding="utf-8")
    with pytest.raises(FormatError, match=r"record 0 \(id 'webshop_7'\): has no 'agentloop' fields; give the env"):
        import_trajectories(store, path, "eto", stage="experts")
    assert store.trajectories() == []


def test_pairs_import_only_from_agentloop_exports(store: ReplayStore, tmp_path: Path) -> None:
    path = tmp_path / "pm.json"
    eto_pair = {"id": "7", "prompt": ETO_SFT[0]["conversations"][:3], "chosen": [], "rejected": []}
    path.write_text(json.dumps([eto_pair]), encoding="utf-8")
    with pytest.raises(FormatError, match=r"record 0 \(id '7'\): has no 'agentloop' fields: only pairs agentloop"):
        import_pairs(store, path, "eto", stage="import/pairs")
    assert store.pairs() == [] and store.completed_stages() == []


def test_mismatched_pair_sides_are_refused(store: ReplayStore, tmp_path: Path) -> None:
    pairs, _ = pairs_and_trajectories()
    record = pair_record(pairs[1], "chat")
    record["agentloop"]["rejected"]["task"]["task_id"] = "train-2"
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"line 1 \(id 'train-1'\): its sides attempt different tasks"):
        import_pairs(store, path, "chat", stage="import/pairs")
    assert store.pairs() == [] and store.trajectories() == []


def test_an_import_into_a_complete_stage_stores_nothing(store: ReplayStore, tmp_path: Path) -> None:
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(ETO_SFT), encoding="utf-8")
    import_trajectories(store, path, "eto", stage="experts", env="webshop")
    with pytest.raises(ValueError, match="already complete"):
        import_trajectories(store, path, "eto", stage="experts", env="webshop")
    assert len(store.trajectories()) == 2


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_trajectories(tmp_path / "nowhere.json", "eto", env="db")
