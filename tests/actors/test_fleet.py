"""The rollout fleet on real Ray actors: dynamic dealing, an actor killed mid-stage, a version
published mid-stage, on both backends (a tiny random model, fp32)."""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ["transformers", pytest.param("vllm", marks=pytest.mark.slow)]
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _config(data_dir: Path, model: Path, backend: str, *overrides: str):
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    from agentloop.config import load_config

    config = load_config(
        eto.ETOConfig,
        None,
        [
            f"data_dir={data_dir}",
            f"policy.model={model}",
            f"policy.backend={backend}",
            "policy.dtype=float32",
            "policy.vllm.enforce_eager=true",
            "policy.batch_size=4",
            "rollout.actors=2",
            "rollout.concurrent_episodes=3",
            "rollout.sampling.max_new_tokens=8",
            "db.max_turns=3",
            *overrides,
        ],
    )
    config.fit_lengths()
    return config


def _key(t) -> str:
    return f"{t.task.env}/{t.task.task_id}"


def _adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """A random LoRA adapter on every linear layer (far from zero, so each version acts differently)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(out)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_actor_killed_mid_stage_loses_nothing_and_is_replaced(cluster, data_dir, tiny_model_dir, db_tasks, backend):
    import ray

    from agentloop.actors.fleet import Fleet
    from agentloop.rollout import RolloutStats

    # Episodes long enough (5 turns of 24 tokens, 2 at a time per actor) that the victim still
    # plays some when the first one comes back.
    longer = ["rollout.concurrent_episodes=2", "rollout.sampling.max_new_tokens=24", "db.max_turns=5"]
    fleet = Fleet(_config(data_dir, tiny_model_dir, backend, *longer), db_tasks)
    try:
        fleet.ensure(0, None)
        keys = [_key(t) for t in db_tasks]
        got, stats, victim = [], None, None
        for item in fleet.play(keys, "eval", 0, batch_size=1):
            if isinstance(item, RolloutStats):
                stats = item
                continue
            got += item
            if victim is None:  # kill the actor with the most episodes taken and not yet returned
                returned = {_key(t) for t in got}
                held = {n: set(ray.get(fleet.dealer.taken_by.remote(n))) - returned for n in fleet.actors}
                name = max(held, key=lambda n: len(held[n]))
                if held[name]:
                    victim = name
                    ray.kill(fleet.actors[victim], no_restart=True)
        assert Counter(_key(t) for t in got) == Counter(keys)  # every episode once: none lost, none twice
        assert stats.actors_lost == 1 and stats.replayed_episodes >= 1 and stats.episodes == len(keys)
        assert victim is not None and victim not in fleet.actors and len(fleet.actors) == 1

        fleet.ensure(0, None)  # the next stage starts with a new actor in the dead one's place
        assert sorted(fleet.actors) == sorted({"rollout-1", "rollout-2"} - {victim} | {"rollout-3"})
        again = [t for item in fleet.play(keys[:4], "eval", 0) if isinstance(item, list) for t in item]
        assert sorted(_key(t) for t in again) == sorted(keys[:4])
    finally:
        fleet.close()


def test_a_stage_left_early_leaves_nothing_running_that_takes_the_next_ones_episodes(
    cluster, data_dir, tiny_model_dir, db_tasks
):
    from agentloop.actors.fleet import Fleet

    fleet = Fleet(_config(data_dir, tiny_model_dir, "transformers"), db_tasks)
    try:
        fleet.ensure(0, None)
        keys = [_key(t) for t in db_tasks]
        left = fleet.play(keys, "eval", 0, batch_size=1)
        next(left)
        left.close()  # as when the driver's store fails mid-stage
        again = [t for item in fleet.play(keys, "eval", 0) if isinstance(item, list) for t in item]
        assert Counter(_key(t) for t in again) == Counter(keys)
    finally:
        fleet.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_version_published_mid_stage_reaches_every_actor_and_each_turn_records_the_version_that_made_it(
    cluster, data_dir, tiny_model_dir, db_tasks, tmp_path, backend
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from agentloop.actors.fleet import Fleet
    from agentloop.actors.transfer import pack_dir
    from agentloop.learners.mismatch import learner_scores
    from agentloop.rollout import RolloutStats

    adapters = {v: _adapter(tiny_model_dir, tmp_path / f"v{v}", seed=v) for v in (1, 2)}
    fleet = Fleet(_config(data_dir, tiny_model_dir, backend), db_tasks)
    try:
        fleet.ensure(1, pack_dir(adapters[1]))
        got, published = [], False
        for item in fleet.play([_key(t) for t in db_tasks], "explore", 1, batch_size=1):
            if isinstance(item, RolloutStats):
                continue
            got += item
            if not published:
                fleet.publish(2, pack_dir(adapters[2]))
                published = True
    finally:
        fleet.close()

    turns = [(t, m) for t in got for m in t.messages if m.role == "assistant"]
    versions = Counter(m.policy_version for _, m in turns)
    assert versions[1] > 0 and versions[2] > 0, versions  # the new version went live mid-stage
    assert {t.policy_version for t in got} == {1, 2}  # an episode with turns of both counts as the older

    # Every turn's recorded log-probs are those of the adapter its version names, not the other's.
    torch.manual_seed(0)
    scores = {}
    for version, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        scores[version] = learner_scores(PeftModel.from_pretrained(base, str(path)).eval(), got)
    for i, t in enumerate(got):
        recorded = [m for m in t.messages if m.role == "assistant" and m.logprobs]
        for j, m in enumerate(recorded):
            own = scores[m.policy_version][i][j]
            other = scores[3 - m.policy_version][i][j]
            assert max(abs(a - b) for a, b in zip(m.logprobs, own.logprobs, strict=True)) < 1e-3
            assert all(own.argmax)  # greedy: each token was the argmax of its own version
            assert max(abs(a - b) for a, b in zip(m.logprobs, other.logprobs, strict=True)) > 0.05


def test_chains_of_trials_with_long_term_memory_survive_an_actor_killed_mid_stage(
    cluster, data_dir, tiny_model_dir, db_tasks
):
    import ray

    from agentloop.actors.fleet import Fleet
    from agentloop.memory import LongTermMemory, MemoryConfig, distill

    # Budgets in the tiny model's tokens, about one per character.
    trials = MemoryConfig(
        trials=3, short_term_tokens=1500, long_term_tokens=1000, long_term_k=2, recall="all"
    )  # a random model solves nothing
    memory = ray.remote(num_cpus=0)(LongTermMemory).remote()
    longer = ["rollout.concurrent_episodes=2", "rollout.sampling.max_new_tokens=24", "db.max_turns=3"]
    longer.append("rollout.max_context_tokens=6144")
    fleet = Fleet(_config(data_dir, tiny_model_dir, "transformers", *longer), db_tasks)
    tasks = [t for t in db_tasks[:6]]
    keys = [_key(t) for t in tasks]
    try:
        fleet.ensure(0, None)
        got, victim = [], None
        stage = fleet.play(keys, "explore", 1, batch_size=1, trials=trials, memory=memory)
        for item in stage:
            if not isinstance(item, list):
                stats = item
                continue
            got += item
            ray.get(memory.add.remote([distill(t, "explore/1") for t in item]))  # as the driver's store does
            if victim is None:  # kill an actor holding a chain it has begun and not finished
                begun = {_key(t) for t in got}
                held = {n: set(ray.get(fleet.dealer.taken_by.remote(n))) & begun for n in fleet.actors}
                held = {n: k - {_key(t) for t in got if t.trial == 2} for n, k in held.items()}
                name = max(held, key=lambda n: len(held[n]))
                if held[name]:
                    victim = name
                    ray.kill(fleet.actors[victim], no_restart=True)
        assert victim is not None and stats.actors_lost == 1
        # Every trial of every chain exactly once: a chain the dead actor began went on elsewhere.
        assert Counter((_key(t), t.trial) for t in got) == Counter((k, n) for k in keys for n in range(3))
        for t in got:
            assert t.reflection  # the policy reflected after every trial
            assert t.memory.count("Attempt ") == t.trial  # shown its chain's earlier trials, all of them
        # Trials recall other tasks from long-term memory, never their own.
        recalled = [t for t in got if "Experience from similar tasks:" in t.memory]
        assert recalled and stats.memory_tokens > 0
        for t in recalled:
            assert f"Task: {t.task.instruction[:40]}" not in t.memory
    finally:
        fleet.close()
        ray.kill(memory)
