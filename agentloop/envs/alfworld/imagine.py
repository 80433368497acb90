"""Imagined ALFWorld goals (STE's imagination): a new goal of one of ALFWorld's six task types,
over the objects and receptacles of a training game's scene.

The explorer is shown the scene (the objects that can be picked up, the receptacles, the
lamps) and ALFWorld's six kinds of task, and writes a task sentence in ALFWorld's own words
("put a hot egg in diningtable."). :func:`imagined_task` reads the sentence with ALFWorld's
templates, checks it against the scene (the object exists and can be picked up, heated,
cooled or cleaned as the task needs; the receptacle or lamp exists; two objects for a
"two" task), and writes the scene's game again with the new goal in ALFWorld's PDDL and the
new sentence in its grammar. The engine's own planner (fast-downward, through TextWorld's
``policy_commands``) must then find a plan, and replaying the plan must make the engine
report the goal won: the goal is scored by the engine's own goal conditions, and the plan
becomes the game's walkthrough (its expert demonstration).

The new game is written once under :func:`agentloop.config.cache_dir`, named by its content;
the task also carries its text, so an environment on another machine writes it again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from agentloop.config import cache_dir
from agentloop.envs.alfworld.config import ALFWorldEnvConfig
from agentloop.envs.alfworld.tasks import ALFWorldTask, task_sentence, write_once
from agentloop.types import Task

LAMPS = ("DeskLamp", "FloorLamp")
"""The lamps of ``look_at_obj_in_light`` tasks."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "pick_and_place_simple": (r"put (?:a|an|some) (?P<obj>\w+) (?:in|on) (?P<recep>\w+)",),
    "look_at_obj_in_light": (
        r"look at (?:(?:a|an|the|some) )?(?P<obj>\w+) under the (?P<lamp>\w+)",
        r"examine the (?P<obj>\w+) with the (?P<lamp>\w+)",
    ),
    "pick_clean_then_place_in_recep": (
        r"clean (?:a|an|some|the) (?P<obj>\w+) and put it (?:in|on) (?P<recep>\w+)",
        r"put a clean (?P<obj>\w+) (?:in|on) (?P<recep>\w+)",
    ),
    "pick_heat_then_place_in_recep": (
        r"heat (?:a|an|some|the) (?P<obj>\w+) and put it (?:in|on) (?P<recep>\w+)",
        r"put a hot (?P<obj>\w+) (?:in|on) (?P<recep>\w+)",
    ),
    "pick_cool_then_place_in_recep": (
        r"cool (?:a|an|some|the) (?P<obj>\w+) and put it (?:in|on) (?P<recep>\w+)",
        r"put a cool (?P<obj>\w+) (?:in|on) (?P<recep>\w+)",
    ),
    "pick_two_obj_and_place": (
        r"put two (?P<obj>\w+) (?:in|on) (?P<recep>\w+)",
        r"find two (?P<obj>\w+) and put them (?:in|on) (?P<recep>\w+)",
    ),
}
"""ALFWorld's task sentences, per task type (the forms its games use)."""

EXAMPLES = {
    "pick_and_place_simple": "put a {obj} in {recep}.",
    "look_at_obj_in_light": "look at {obj} under the {lamp}.",
    "pick_clean_then_place_in_recep": "clean some {obj} and put it in {recep}.",
    "pick_heat_then_place_in_recep": "heat some {obj} and put it in {recep}.",
    "pick_cool_then_place_in_recep": "cool some {obj} and put it in {recep}.",
    "pick_two_obj_and_place": "put two {obj} in {recep}.",
}
NEEDS = {
    "pick_clean_then_place_in_recep": ("cleanable", "isClean"),
    "pick_heat_then_place_in_recep": ("heatable", "isHot"),
    "pick_cool_then_place_in_recep": ("coolable", "isCool"),
}
"""The property an object needs for the task type, and the state the goal asks of it."""

_SENTENCE_RE = re.compile(r"Task:\s*(.+)", re.IGNORECASE)


@dataclass(frozen=True)
class Scene:
    """What a game's PDDL problem holds: object and receptacle types (ALFWorld's names, e.g. ``CellPhone``)."""

    objects: dict[str, set[str]]
    """Each object type, with its properties (``pickupable``, ``heatable``, ``toggleable``, ...)."""
    counts: dict[str, int]
    """How many objects of each type."""
    receptacles: set[str]
    """The receptacle types."""

    def name(self, kind: str) -> str:
        """A type's name in task sentences (``cellphone``)."""
        return kind.lower()


def scene(problem: str) -> Scene:
    """The scene of a PDDL problem (its ``:init`` part)."""
    init = problem[: problem.find("(:goal")]
    types = dict(re.findall(r"\(objectType (\S+) (\w+)Type\)", init))
    objects: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for kind in types.values():
        objects.setdefault(kind, set())
        counts[kind] = counts.get(kind, 0) + 1
    for prop, obj in re.findall(r"\((pickupable|heatable|coolable|cleanable|toggleable) (\S+)\)", init):
        if obj in types:
            objects[types[obj]].add(prop)
    receptacles = set(re.findall(r"\(receptacleType \S+ (\w+)Type\)", init))
    return Scene(objects, counts, receptacles)


def _game(base: ALFWorldTask) -> dict:
    return json.loads(base.game_text or base.game_file.read_text())


def proposal_prompt(base: ALFWorldTask) -> str:
    """What the explorer is asked: a new task in ``base``'s scene."""
    found = scene(_game(base)["pddl_problem"])
    movable = sorted(found.name(k) for k, props in found.objects.items() if "pickupable" in props)
    lamps = sorted(found.name(k) for k in found.objects if k in LAMPS)
    lines = [
        "Invent a new household task for this room, of one of these kinds (write it exactly in one of these forms):",
        *(f"- {form}" for form in EXAMPLES.values()),
        f"Things that can be picked up: {', '.join(movable)}",
        f"Places to put things: {', '.join(sorted(found.name(r) for r in found.receptacles))}",
        f"Lamps: {', '.join(lamps) or '(none)'}",
        f"The room's own task: {base.task.instruction}",
    ]
    lines.append("Reply exactly as:\nTask: ...")
    return "\n".join(lines)


def parse_sentence(text: str) -> tuple[str, str, dict[str, str]] | str:
    """The (task type, sentence, named things) of a proposal, or a sentence saying why it cannot be read."""
    line = _SENTENCE_RE.search(text or "")
    if line is None:
        return "no Task: line"
    sentence = " ".join(line.group(1).split()).strip().rstrip(".").lower()
    for kind, forms in TEMPLATES.items():
        for form in forms:
            found = re.fullmatch(form, sentence)
            if found:
                return kind, sentence + ".", found.groupdict()
    return f"{sentence!r} is none of ALFWorld's task sentences"


def _goal(kind: str, obj: str, place: str) -> str:
    """ALFWorld's PDDL goal of a task type over an object type and a receptacle (or lamp) type."""
    if kind == "look_at_obj_in_light":
        return (
            "(:goal (and (exists (?ot - object ?r - receptacle ?a - agent ?l - location) (and "
            f"(objectType ?ot {place}Type) (toggleable ?ot) (isToggled ?ot) (receptacleAtLocation ?r ?l) "
            "(atLocation ?a ?l) (inReceptacle ?ot ?r))) "
            f"(exists (?o - object ?a - agent) (and (objectType ?o {obj}Type) (holds ?a ?o)))))"
        )
    if kind == "pick_two_obj_and_place":
        return (
            "(:goal (and (exists (?r - receptacle) (exists (?o1 - object) (and "
            f"(objectType ?o1 {obj}Type) (receptacleType ?r {place}Type) (inReceptacle ?o1 ?r) "
            "(exists (?o2 - object) (and (not (= ?o1 ?o2)) "
            f"(objectType ?o2 {obj}Type) (receptacleType ?r {place}Type) (inReceptacle ?o2 ?r))))))))"
        )
    prop, state = NEEDS.get(kind, (None, None))
    extra = f"({prop} ?o) ({state} ?o) " if prop else ""
    return (
        "(:goal (and (exists (?r - receptacle) (exists (?o - object) (and "
        f"{extra}(objectType ?o {obj}Type) (receptacleType ?r {place}Type) (inReceptacle ?o ?r))))))"
    )


def _plan(game_file: Path, timeout_s: float) -> list[str] | str:
    """The engine planner's plan for a game, replayed: its commands if they win the game, else why not."""
    from agentloop.envs.alfworld.engine import ENGINE_LOCK, planning_engine

    engine = planning_engine()
    try:
        with ENGINE_LOCK:
            engine.load(str(game_file))
            state = engine.reset()
            plan = list(state["policy_commands"] or [])
            if not plan:
                return "the engine's planner finds no plan"
            for command in plan:
                state, _, _ = engine.step(command)
            return plan if state["won"] else "the planner's plan does not win the game"
    finally:
        with ENGINE_LOCK:
            engine.close()


def write_game(game: dict) -> tuple[Path, str]:
    """Writes a game under the cache (named by its content) unless it is there; returns its path and text."""
    text = json.dumps(game, sort_keys=True)
    path = cache_dir() / "alfworld" / "imagined" / hashlib.sha256(text.encode()).hexdigest()[:24] / "game.tw-pddl"
    write_once(path, text)
    return path, text


def imagined_task(base: ALFWorldTask, text: str, config: ALFWorldEnvConfig, task_id: str) -> ALFWorldTask | str:
    """The game a proposal describes in ``base``'s scene, or a sentence saying why it is not kept.

    Args:
        base: The training game whose scene the task is set in.
        text: The explorer's proposal (:func:`proposal_prompt`'s format).
        config: The environment's settings (``max_steps`` bounds the plan, ``load_timeout_s`` the planner).
        task_id: The new task's id (split ``imagined``).
    """
    parsed = parse_sentence(text)
    if isinstance(parsed, str):
        return parsed
    kind, sentence, named = parsed
    game = _game(base)
    found = scene(game["pddl_problem"])
    by_name = {found.name(k): k for k in found.objects}
    obj = by_name.get(named["obj"])
    if obj is None or "pickupable" not in found.objects[obj]:
        return f"the room has no {named['obj']} that can be picked up"
    if kind in NEEDS and NEEDS[kind][0] not in found.objects[obj]:
        return f"a {named['obj']} here is not {NEEDS[kind][0]}"
    if kind == "pick_two_obj_and_place" and found.counts[obj] < 2:
        return f"the room has only one {named['obj']}"
    if kind == "look_at_obj_in_light":
        place = by_name.get(named["lamp"])
        if place not in LAMPS:
            return f"the room has no lamp called {named['lamp']}"
    else:
        place = {found.name(r): r for r in found.receptacles}.get(named["recep"])
        if place is None:
            return f"the room has no {named['recep']} to put things in"
    if sentence == base.task.instruction.strip().lower():
        return "the room's own task"
    problem = game["pddl_problem"]
    game = {
        **game,
        "pddl_problem": problem[: problem.find("(:goal")] + _goal(kind, obj, place) + "\n)\n",
        "grammar": task_sentence(game["grammar"], sentence),
        "walkthrough": [],
    }
    path, _ = write_game(game)
    plan = _plan(path, config.load_timeout_s)
    if isinstance(plan, str):
        return plan
    if len(plan) > config.max_steps:
        return f"the shortest plan the planner found takes {len(plan)} steps (at most {config.max_steps})"
    game["walkthrough"] = plan
    path, game_text = write_game(game)
    return ALFWorldTask(Task("alfworld", task_id, "imagined", kind, sentence), path, tuple(plan), game_text)


def judge_evidence(task: ALFWorldTask, config: ALFWorldEnvConfig) -> str:
    """What a judge reads of an imagined game: the task and the plan that solves it."""
    return "\n".join(
        [f"Task: {task.task.instruction}", "Solution (the planner's commands):", *(f"- {c}" for c in task.walkthrough)]
    )
