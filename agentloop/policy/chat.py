"""Turn formats: how a conversation becomes the exact tokens a policy sees and trains on.

A conversation is tokenized segment by segment, never as one re-tokenized string, so the
tokens generated during a rollout are the tokens trained on and the assistant-only mask
falls exactly on them:

* a user segment is ``[bos] [sep] <user-open> content <user-close> <assistant-open>``
  (``bos`` only for the first message, ``sep`` only after an assistant turn), so the
  generation prompt is part of the user segment;
* an assistant segment is ``content <stop>``: exactly what the policy generates.

The base Gemma 3 checkpoint ships no chat template, but its tokenizer has the turn tokens;
:func:`turn_format_for` picks Gemma's turns or ChatML by the special tokens a tokenizer has.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from agentloop.types import Message, Trajectory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TurnFormat:
    """The strings around each turn; ``stop`` ends an assistant turn."""

    name: str
    user_open: str
    user_close: str
    stop: str
    sep: str = "\n"


GEMMA = TurnFormat(
    name="gemma",
    user_open="<start_of_turn>user\n",
    user_close="<end_of_turn>\n<start_of_turn>model\n",
    stop="<end_of_turn>",
)
CHATML = TurnFormat(
    name="chatml",
    user_open="<|im_start|>user\n",
    user_close="<|im_end|>\n<|im_start|>assistant\n",
    stop="<|im_end|>",
)


def turn_format_for(tokenizer: Any) -> TurnFormat:
    """The turn format whose special tokens the tokenizer knows.

    Raises:
        ValueError: If the tokenizer has neither Gemma's nor ChatML's turn tokens.
    """
    vocab = tokenizer.get_vocab()
    for fmt in (GEMMA, CHATML):
        if fmt.stop in vocab:
            return fmt
    raise ValueError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither Gemma's "
        "<end_of_turn> nor ChatML's <|im_end|> token; agentloop cannot format its turns"
    )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and special tokens: equal for the same tokenizer however loaded."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted(str(v) for v in tokenizer.special_tokens_map.values())
    return hashlib.sha1(repr((vocab, specials)).encode()).hexdigest()[:16]


class ChatTokenizer:
    """Tokenizes conversations turn by turn for one tokenizer and turn format."""

    def __init__(self, tokenizer: Any, fmt: TurnFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.format = fmt or turn_format_for(tokenizer)
        self.stop_id = tokenizer.convert_tokens_to_ids(self.format.stop)
        # An assistant turn ends at the turn's stop token, or at ``eos`` if the model emits it.
        eos = tokenizer.eos_token_id
        self.stop_ids = (self.stop_id,) if eos is None or eos == self.stop_id else (self.stop_id, eos)
        self.name = f"{self.format.name}:{tokenizer_fingerprint(tokenizer)}"
        self.retokenized = 0
        """Trajectories of another tokenizer that :meth:`tokenize` re-tokenized from their text."""

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def count(self, text: str) -> int:
        """Tokens of ``text`` on its own (memory budgets)."""
        return len(self._encode(text))

    def user_segment(self, content: str, *, first: bool) -> list[int]:
        """Tokens of a user turn, ending with the opening of the assistant's turn."""
        text = ("" if first else self.format.sep) + self.format.user_open + content + self.format.user_close
        bos = [self.tokenizer.bos_token_id] if first and self.tokenizer.bos_token_id is not None else []
        return bos + self._encode(text)

    def assistant_segment(self, content: str) -> list[int]:
        """Tokens of an assistant turn written as text (e.g. an expert's), stop token included."""
        return self._encode(content) + [self.stop_id]

    def decode_completion(self, token_ids: Sequence[int]) -> str:
        """The text of generated tokens, without the stop token and anything after it."""
        ids = list(token_ids)
        for i, t in enumerate(ids):
            if t in self.stop_ids:
                ids = ids[:i]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokenize_messages(self, messages: Sequence[Message]) -> tuple[Message, ...]:
        """Fills in ``token_ids`` of messages that have none; keeps those that have them."""
        out = []
        for i, m in enumerate(messages):
            if not m.token_ids:
                ids = (
                    self.user_segment(m.content, first=i == 0)
                    if m.role == "user"
                    else self.assistant_segment(m.content)
                )
                m = replace(m, token_ids=tuple(ids))
            out.append(m)
        return tuple(out)

    def tokenize(self, trajectory: Trajectory) -> Trajectory:
        """The trajectory with every message tokenized in this format.

        Trajectories produced under another tokenizer are re-tokenized from their text: the
        first one logs a warning and every one is counted in :attr:`retokenized`. Those
        that were never tokenized (expert demonstrations) are tokenized without a warning.
        """
        if trajectory.tokenizer == self.name and all(m.token_ids for m in trajectory.messages):
            return trajectory
        if trajectory.tokenizer != self.name:
            if trajectory.tokenizer:  # tokens of another tokenizer: the text is all that carries over
                if not self.retokenized:
                    logger.warning(
                        "trajectories tokenized by %s are re-tokenized from their text for %s (counted in "
                        "<stage>/retokenized); the learner then trains on tokens the policy did not produce",
                        trajectory.tokenizer,
                        self.name,
                    )
                self.retokenized += 1
            trajectory = replace(trajectory, messages=tuple(replace(m, token_ids=()) for m in trajectory.messages))
        return replace(trajectory, messages=self.tokenize_messages(trajectory.messages), tokenizer=self.name)
