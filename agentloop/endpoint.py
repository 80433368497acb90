"""A client for OpenAI-compatible chat endpoints: a teacher that reflects, a judge that decides.

STE's reflections and judgements can come from the policy itself (the default) or from any
server that speaks OpenAI's chat-completions API: a larger model served by ``vllm serve``,
a hosted API. Requests are plain chat messages; the ``openai`` package (installed with vLLM)
is imported on first use, so this module is as light as the records it works on.

A failed request is retried (``retries``, with the client's back-off); one that still fails
raises :class:`EndpointError` naming the endpoint, never returns an empty answer silently.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agentloop.config import ConfigError

logger = logging.getLogger(__name__)


class EndpointError(RuntimeError):
    """An endpoint did not answer (after its retries), or answered with nothing."""


@dataclass
class EndpointConfig:
    """Where a role's model is served; an empty ``url`` means the policy plays the role itself."""

    url: str = ""
    """Base URL of an OpenAI-compatible API, e.g. ``http://head:8000/v1``; empty = the policy."""
    model: str = ""
    """The served model's name, as the server lists it (``/v1/models``)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (a local vLLM server takes any key)."""
    max_tokens: int = 160
    """Longest answer, in the endpoint model's tokens."""
    temperature: float = 0.0
    timeout_s: float = 60.0
    retries: int = 2

    def validate(self) -> None:
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"url must start with http:// or https://, got {self.url!r}")
        if self.url and not self.model:
            raise ConfigError("model: name the served model (as its /v1/models lists it) when url is set")
        if self.max_tokens < 1 or self.timeout_s <= 0 or self.retries < 0:
            raise ConfigError("max_tokens must be >= 1, timeout_s > 0 and retries >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.url)


class Endpoint:
    """Chat completions from one configured endpoint; safe to call from several threads."""

    def __init__(self, config: EndpointConfig) -> None:
        if not config.enabled:
            raise ValueError("an Endpoint needs a url (an empty url means the policy plays the role)")
        self.config = config
        self._client: Any = None
        self._lock = threading.Lock()

    def _openai(self) -> Any:
        with self._lock:
            if self._client is None:
                from openai import OpenAI

                self._client = OpenAI(
                    base_url=self.config.url,
                    api_key=os.environ.get(self.config.api_key_env) or "EMPTY",
                    timeout=self.config.timeout_s,
                    max_retries=self.config.retries,
                )
            return self._client

    def check(self, key: str) -> None:
        """Asks the endpoint one short question, so a wrong url or model fails before any work
        starts, naming the config section ``key`` (e.g. ``memory.teacher``).

        Raises:
            EndpointError: When the endpoint does not answer.
        """
        try:
            self.chat([{"role": "user", "content": "Reply with OK."}])
        except EndpointError as e:
            raise EndpointError(f"{key}: {e}") from e

    def answers(self, prompts: Sequence[str], system: str = "", threads: int = 8) -> list[str]:
        """The answer to each prompt (one user turn after ``system``, if any), ``threads`` requests at a time.

        Raises:
            EndpointError: When a request fails (see :meth:`chat`).
        """
        from concurrent.futures import ThreadPoolExecutor

        preamble = [{"role": "system", "content": system}] if system else []
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda p: self.chat([*preamble, {"role": "user", "content": p}]), prompts))

    def chat(self, messages: Sequence[dict[str, str]]) -> str:
        """The endpoint's answer to a conversation of ``{"role": ..., "content": ...}`` messages.

        Raises:
            EndpointError: When the request failed after its retries, or the answer is empty.
        """
        import openai

        config = self.config
        try:
            reply = self._openai().chat.completions.create(
                model=config.model,
                messages=list(messages),
                max_tokens=config.max_tokens,
                temperature=config.temperature,
            )
        except openai.OpenAIError as e:
            raise EndpointError(f"{config.url} ({config.model}): {type(e).__name__}: {e}") from e
        text = (reply.choices[0].message.content or "").strip() if reply.choices else ""
        if not text:
            raise EndpointError(f"{config.url} ({config.model}) returned an empty answer")
        return text
