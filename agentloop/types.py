"""The records that flow between environments, policies, the replay store and learners.

Every record is a frozen dataclass: a new field is a deliberate schema change, never a
key slipped into a dict. This module imports nothing heavier than the standard library,
so every layer of agentloop can depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["user", "assistant"]
"""Who wrote a message: the environment (``user``) or the policy (``assistant``)."""

Source = Literal["expert", "explore", "eval"]
"""Why a trajectory exists: a demonstration, a training-task exploration, or an evaluation."""


@dataclass(frozen=True)
class Task:
    """One task of one environment, as the loop and the store see it."""

    env: str
    """Name of the environment that owns the task, e.g. ``"db"``."""
    task_id: str
    """Identifier, unique and stable within ``env`` (e.g. ``"train-0042"``)."""
    split: str
    """Which split the task belongs to, e.g. ``"train"`` or ``"dev"``."""
    kind: str
    """Task family used for per-kind metrics, e.g. ``"SELECT"``, ``"INSERT"``, ``"UPDATE"``."""
    instruction: str
    """The natural-language goal, as a person would read it."""

    @property
    def key(self) -> str:
        """``"<env>/<task_id>"``: how a stage, the replay store and the rollout fleet name the task's episode
        (or, with STE's trials, its chain of trials)."""
        return f"{self.env}/{self.task_id}"


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, with the exact tokens the policy saw or produced.

    A conversation's training tokens are the concatenation of its messages' ``token_ids``;
    the assistant-only loss mask is 1 exactly on the ``assistant`` messages' tokens. For a
    user message the ids cover its whole rendered segment (turn markers and the opening of
    the next model turn included); for an assistant message they are the generated ids,
    stop token included.
    """

    role: Role
    """``user`` for what the environment said, ``assistant`` for what the policy said."""
    content: str
    """The message text (for the assistant, the decoded completion without the stop token)."""
    token_ids: tuple[int, ...] = ()
    """The tokens of this message's segment; empty when the text was never tokenized."""
    logprobs: tuple[float, ...] = ()
    """For a generated assistant turn, the log-probability of each of its ``token_ids`` under
    the serving model's raw distribution (before temperature or top-p), as the backend that
    sampled it computed it; empty when none was recorded (experts, user turns)."""
    policy_version: int | None = None
    """For a generated assistant turn, the policy version whose weights produced it, as the
    backend reported it; None for turns no policy generated."""


@dataclass(frozen=True)
class Trajectory:
    """One episode: a task, the conversation that attempted it, and how it ended."""

    task: Task
    """The task attempted."""
    messages: tuple[Message, ...]
    """The conversation, starting with the environment's first observation."""
    tokenizer: str
    """Identifier of the tokenizer and turn format that produced the ``token_ids``."""
    reward: float
    """The final reward the environment gave (for binary tasks 0.0 or 1.0)."""
    success: bool
    """Whether the environment judged the task solved."""
    terminated: bool
    """The episode ended because the task ended (an answer was given or scored)."""
    truncated: bool
    """The episode ended because a turn or token budget ran out."""
    num_turns: int
    """Number of assistant turns taken."""
    invalid_actions: int
    """Number of assistant turns the environment rejected as malformed."""
    source: Source
    """``expert``, ``explore`` or ``eval``."""
    policy_version: int
    """Version of the policy that acted (0 = base model; -1 for experts)."""
    iteration: int
    """Loop iteration that produced it (0 = before any ETO round)."""
    generated_tokens: int = 0
    """Number of tokens the policy generated in the episode (throughput metrics)."""
    tamper_attempts: int = 0
    """Actions the environment recorded as attempts to change what its success check depends on
    (writing where checks live, shadowing the programs they run, ...); 0 for environments
    without such a channel."""
    trial: int = 0
    """Which attempt at its task this episode was within its stage (STE's trials: 0 for the first
    or only one, 1 for the second, ...)."""
    memory: str = ""
    """Memory the policy was shown before the task's first observation (earlier trials of the
    task, experience of similar ones); it starts the first message's ``content`` and tokens.
    Empty when the episode ran without memory."""
    reflection: str = ""
    """What the policy (or a teacher) wrote about the episode once it ended, for later trials;
    not part of ``messages``. Empty when nobody reflected."""

    @property
    def token_ids(self) -> list[int]:
        """The conversation's tokens, in order."""
        return [t for m in self.messages for t in m.token_ids]

    @property
    def actions(self) -> tuple[str, ...]:
        """The policy's turns (its messages' text), in order."""
        return tuple(m.content for m in self.messages if m.role == "assistant")

    @property
    def assistant_mask(self) -> list[int]:
        """1 on tokens the policy produced, 0 on tokens the environment produced."""
        return [int(m.role == "assistant") for m in self.messages for _ in m.token_ids]


@dataclass(frozen=True)
class Attempt:
    """One episode a rollout is asked to play: a task, with the memory to show and which trial it is."""

    task: Task
    """The task attempted."""
    trial: int = 0
    """The attempt's number among the task's trials in its stage (0 = first or only)."""
    memory: str = ""
    """Text shown before the task's first observation (see :attr:`Trajectory.memory`)."""
    temperature: float | None = None
    """Sampling temperature of the attempt's turns (0 = greedy); None: the rollout's own."""
    avoid: tuple[str, ...] = ()
    """First actions the attempt should not begin with (its task's earlier trials' first actions, stripped)."""
    redraws: int = 0
    """Times a first turn that is, verbatim, one of ``avoid`` is drawn again (sampling) before it is played."""


@dataclass(frozen=True)
class Experience:
    """One trial distilled for long-term memory (STE): what was tried on a task and how it went."""

    task: Task
    """The task tried."""
    success: bool
    """Whether the trial solved it (the environment's verdict, or a judge's on an imagined task)."""
    reward: float
    """The trial's final reward."""
    reflection: str
    """What was written about the trial after it ended ("" when nobody reflected)."""
    actions: tuple[str, ...]
    """The trial's actions (assistant turns), in order."""
    stage: str
    """The loop stage whose trial it distills (``explore/1``, ...): memory is versioned with the run."""
    trial: int = 0
    """Which trial of the task in that stage."""


@dataclass(frozen=True)
class Proposal:
    """A task an explorer imagined near a training task (STE), and whether the env could take it."""

    env: str
    """The environment the task is for."""
    base_task_id: str
    """The training task it was imagined from (its table, scene, product, ...)."""
    task_id: str
    """The id the new task gets (split ``imagined``), unique within the run."""
    text: str
    """The explorer's proposal, as written."""
    stage: str
    """The loop stage that imagined it (``imagine/1``, ...)."""
    valid: bool
    """Whether the environment built a task it can score from it."""
    reason: str = ""
    """Why the environment could not (empty when valid)."""
    judged: bool | None = None
    """The judge's verdict on a valid proposal: does its own solution do what it asks? (None:
    not judged). A task the judge accepts is verified, and its solution becomes a demonstration."""


@dataclass(frozen=True)
class Pair:
    """A preference pair for DPO: two trajectories of the same task, one preferred."""

    task: Task
    """The task both trajectories attempted."""
    chosen: Trajectory
    """The trajectory with the higher reward."""
    rejected: Trajectory
    """The trajectory with the lower reward (possibly cut, as ETO does)."""
    iteration: int
    """Loop iteration that built the pair."""
