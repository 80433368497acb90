"""Turn-by-turn tokenization: the assistant mask covers exactly the assistant text."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from agentloop.policy.chat import GEMMA, ChatTokenizer, turn_format_for
from agentloop.types import Message, Task, Trajectory


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    return ChatTokenizer(AutoTokenizer.from_pretrained(tiny_model_dir))


def _trajectory(messages, tokenizer=""):
    task = Task(env="db", task_id="train-0", split="train", kind="SELECT", instruction="q")
    return Trajectory(task, tuple(messages), tokenizer, 1.0, True, True, False, 2, 0, "expert", -1, 0)


def test_mask_decodes_to_assistant_turns(chat):
    texts = ["Action: Operation\n```sql\nSELECT 1;\n```", "Action: Answer\nFinal Answer: [1]"]
    messages = [
        Message("user", "question"),
        Message("assistant", texts[0]),
        Message("user", "[(1,)]"),
        Message("assistant", texts[1]),
    ]
    t = chat.tokenize(_trajectory(messages))
    ids, mask = t.token_ids, t.assistant_mask
    assert len(ids) == len(mask)
    kept = [i for i, m in zip(ids, mask, strict=True) if m]
    stop = chat.format.stop
    assert chat.tokenizer.decode(kept) == texts[0] + stop + texts[1] + stop
    dropped = chat.tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if not m])
    assert dropped.startswith(chat.tokenizer.bos_token + GEMMA.user_open + "question")
    assert "[(1,)]" in dropped and ids[0] == chat.tokenizer.bos_token_id


def test_existing_token_ids_are_kept_and_other_tokenizers_redone(chat):
    generated = (5, 6, chat.stop_id)
    messages = [Message("user", "q"), Message("assistant", "whatever", generated)]
    t = chat.tokenize(_trajectory(messages, tokenizer=chat.name))
    assert t.messages[1].token_ids == (5, 6, chat.stop_id)  # tokens in, tokens out: never re-tokenized
    from dataclasses import replace

    foreign = replace(t, tokenizer="chatml:other")
    assert chat.tokenize(foreign).messages[1].token_ids == tuple(chat.assistant_segment("whatever"))


def test_unknown_turn_tokens_are_refused():
    class Plain:
        name_or_path = "plain"

        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match="neither"):
        turn_format_for(Plain())
