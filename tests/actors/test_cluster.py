"""The cluster path on this machine: Ray's multi-node test cluster (one raylet per node, each
with its own resources), a rollout actor on each of two nodes, one node killed mid-stage,
episodes stored as they finish in PostgreSQL."""

from __future__ import annotations

import os
from collections import Counter

import pytest
from test_fleet import _config, _key

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # The head runs the driver and the dealer only: no CPUs for actors there.
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [made.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=made.address, log_to_driver=False)
    made.wait_for_nodes()
    yield made, nodes
    ray.shutdown()
    made.shutdown()


def test_a_node_lost_mid_stage_loses_no_episode_and_the_store_holds_each_once(
    cluster, data_dir, tiny_model_dir, db_tasks, postgres_server, tmp_path
):
    import ray

    from agentloop.actors.fleet import Fleet
    from agentloop.loop import RunDir, Stages
    from agentloop.metrics import MetricsLogger
    from agentloop.replay import ReplayStore

    made, nodes = cluster
    fleet = Fleet(_config(data_dir, tiny_model_dir, "transformers"), db_tasks)
    placed = {name: node for name, (node, _) in fleet._placed.items()}
    assert sorted(placed.values()) == sorted(n.node_id for n in nodes)  # one actor per node
    # Lose a node other than the driver's (the driver may sit on any raylet of this one machine;
    # the dealer sits with it).
    here = ray.get_runtime_context().get_node_id()
    doomed, survivor = sorted(placed, key=lambda name: placed[name] == here)

    store = ReplayStore(postgres_server.create_database("cluster_run"))
    stages = Stages(RunDir(tmp_path), store, MetricsLogger(tmp_path))
    keys = [_key(t) for t in db_tasks]
    killed = []

    def play(todo, begun):
        fleet.ensure(0, None)
        for item in fleet.play(todo, "eval", 0, batch_size=1):
            yield item
            if isinstance(item, list) and not killed:  # a batch is stored: now lose a node
                victim = next(n for n in nodes if n.node_id == placed[doomed])
                made.remove_node(victim)
                killed.append(victim)

    seen = {}

    def metrics_of(trajectories, stats):
        seen["stats"] = stats
        return {"eval/episodes": float(len(trajectories))}

    trajectories = stages.stream("eval/base", 0, keys, play, metrics_of)
    assert killed and seen["stats"].actors_lost == 1
    assert [_key(t) for t in trajectories] == keys
    assert Counter(_key(t) for t in store.trajectories(stage="eval/base")) == Counter(keys)  # each once

    # A new node joins; the next stage replaces the lost actor there.
    fresh = made.add_node(num_cpus=1)
    made.wait_for_nodes()
    fleet.ensure(0, None)
    assert {node for node, _ in fleet._placed.values()} == {placed[survivor], fresh.node_id}
    again = [t for item in fleet.play(keys[:3], "eval", 0) if isinstance(item, list) for t in item]
    assert sorted(_key(t) for t in again) == sorted(keys[:3])
    fleet.close()
    store.close()
    ray.shutdown()
