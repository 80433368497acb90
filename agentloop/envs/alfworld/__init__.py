"""The ALFWorld environment: ALFRED household tasks as text games in the real TextWorld/PDDL engine.

Data. Games are read from ``<data_dir>/alfworld/json_2.1.1/<split>/<task>/<trial>/game.tw-pddl``:
a JSON file with the PDDL domain and problem, the text grammar (which holds the task's
sentence, "Your task is to: ...") and an expert ``walkthrough``. Splits are the data's
folders: ``train`` (883 games, a subset of ALFWorld's 3,553), ``valid_seen`` (140) and
``valid_unseen`` (134, the unseen test split of ALFWorld and ETO), plus ``valid_train`` (200).
A task's id is ``<task folder>/<trial folder>`` and its ``kind`` the task type, the folder
name's prefix (``pick_and_place_simple``, ``look_at_obj_in_light``,
``pick_clean_then_place_in_recep``, ``pick_heat_then_place_in_recep``,
``pick_cool_then_place_in_recep``, ``pick_two_obj_and_place``). Games marked unsolvable in
their file are skipped when loading.

Engine. The games run in TextWorld's PDDL backend (``textworld.envs.pddl.PddlEnv``, the
fast-downward planner grounding each problem), with ALFWorld's ``AlfredDemangler`` giving
objects their readable names ("desk 1"), exactly as ``alfworld``'s own text environment does.
Loading a game grounds its problem twice (load, then reset): 0.4 to 2.5 s on this project's
CPU; steps take tens of milliseconds. Each engine holds its own copy of the planner's shared
library, which textworld never unloads, so engines are pooled per process and reused from
game to game (a new engine per game would leak a library copy each time). textworld's parsers
are module-level and not thread-safe, so one lock serialises every engine call of a process.
The pool loads games ahead on a background thread, which overlaps with the policy's generation
(it does not take the lock): :meth:`ALFWorldEnv.prepare` hands it the games that come
next (the rollout does this with each stage's tasks) and up to ``lookahead`` of them are
loaded while the policy generates; resetting to a game nobody prepared loads it on the spot.
When the last environment of the process closes, loading ahead stops and the engines go idle;
they are never unloaded (unloading the library and loading it again crashes the process).

Protocol (ALFWorld's, as ETO prompts it). Each reply holds one command of ALFWorld's action set
(``go to desk 1``, ``take mug 1 from desk 1``, ``put mug 1 in/on coffeemachine 1``, ``open``,
``close``, ``toggle``, ``clean``, ``heat``, ``cool``, ``use``, ``examine``, ``look``,
``inventory``); text before a final ``Action:`` is allowed, so ReAct replies ("Thought: ...
Action: go to desk 1") work, and only the first line after it counts. The observation is the
engine's feedback; a command the engine does not admit in the current state gets its own
answer, "Nothing happens.", and is marked ``info["invalid"]``. An empty, unreadable or
over-long reply gets an observation saying what was wrong, also marked invalid. Every reply
costs a step; the episode ends when the goal holds (reward 1.0, success) or is truncated
after ``max_steps`` replies (ETO: 40). ``info["admissible_commands"]`` always lists the
commands the engine accepts next; with ``show_valid_actions`` the observation lists them too.

Experts. :func:`build_alfworld_experts` replays each game's walkthrough in the engine and keeps
the games it solves.
"""

from agentloop.envs.alfworld.config import ALFWorldEnvConfig
from agentloop.envs.alfworld.env import ALFWorldEnv
from agentloop.envs.alfworld.experts import build_alfworld_experts
from agentloop.envs.alfworld.imagine import imagined_task, judge_evidence, proposal_prompt
from agentloop.envs.alfworld.tasks import SPLITS, ALFWorldTask, load_alfworld_tasks
from agentloop.envs.registry import EnvDefinition, Imagination

ENV = EnvDefinition(
    name="alfworld",
    splits=SPLITS,
    train_split="train",
    eval_split="valid_unseen",
    load_tasks=load_alfworld_tasks,
    env=ALFWorldEnv,
    config=ALFWorldEnvConfig,
    build_experts=build_alfworld_experts,
    context_tokens=4096,
    median_episode_tokens=488,  # bench/episode_tokens.py: median of 200 train experts
    imagination=Imagination(prompt=proposal_prompt, build=imagined_task, evidence=judge_evidence),
)
"""The ALFWorld environment's registration (``agentloop.envs``)."""

__all__ = ["ENV", "ALFWorldEnv", "ALFWorldEnvConfig", "ALFWorldTask", "build_alfworld_experts", "load_alfworld_tasks"]
