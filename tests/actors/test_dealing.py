"""The dealer and GPU shares as plain Python: what the fleet relies on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from agentloop.actors.fleet import Dealer, gpu_shares
from agentloop.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_the_dealer_hands_out_in_order_and_puts_a_dead_workers_unfinished_episodes_first_in_line():
    dealer = Dealer()
    assert dealer.deal([f"db/{i}" for i in range(6)]) == 1
    assert dealer.take("a", 2) == (["db/0", "db/1"], None)
    assert dealer.take("b", 3) == (["db/2", "db/3", "db/4"], None)
    assert dealer.give_back("b", finished=["db/3"]) == ["db/2", "db/4"]
    assert dealer.take("b", 9)[0] == []  # given up for dead: b takes nothing more, even if still running
    assert dealer.take("a", 9)[0] == ["db/2", "db/4", "db/5"]
    assert dealer.give_back("b", finished=[]) == []  # nothing taken since
    dealer.publish(3, {"adapter_config.json": b"{}"})
    assert dealer.take("a", 0) == ([], 3) and dealer.adapter() == (3, {"adapter_config.json": b"{}"})


def test_a_rollout_left_over_from_an_earlier_deal_takes_nothing_of_the_next():
    dealer = Dealer()
    first = dealer.deal(["db/0", "db/1"])
    second = dealer.deal(["db/2", "db/3"])
    assert dealer.take("a", 5, first) == ([], None)
    assert dealer.take("a", 5, second) == (["db/2", "db/3"], None)


def test_a_dead_workers_chains_go_back_with_their_trials_in_the_same_call():
    dealer = Dealer()
    dealer.deal(["db/a", "db/b", "db/c"], begun={"db/c": ["c0"]})
    dealer.take("w1", 2)
    returned = {"db/a": ["a0", "a1"], "db/c": ["c0"]}  # chains under way, as the driver saw them come back
    assert dealer.give_back("w1", finished=[], begun=returned) == ["db/a", "db/b"]
    # Whoever takes a lost chain next finds its trials already recorded: it goes on after a1.
    keys, _ = dealer.take("w2", 1)
    assert keys == ["db/a"] and dealer.earlier(keys) == {"db/a": ["a0", "a1"]}
    assert dealer.earlier(["db/b", "db/c"]) == {"db/c": ["c0"]}


def test_gpu_shares():
    assert gpu_shares(0, 2, -1) == (0.0, 0.0)  # a CPU cluster
    assert gpu_shares(5, 4, -1) == (1.0, 1.0)  # a GPU for each rollout actor and the learner
    assert gpu_shares(1, 1, -1) == (0.5, 0.5)  # one GPU: rollout and learner take turns on it
    assert gpu_shares(8, 4, 0.5) == (0.5, 1.0)
    assert gpu_shares(2, 3, 0.5) == (0.5, 0.5)  # the learner shares a GPU with one rollout actor
    for total, actors, each in ((1, 2, -1), (2, 2, -1), (4, 4, 1), (2, 4, 0.5)):  # nothing left for the learner
        with pytest.raises(ConfigError, match="rollout.num_gpus"):
            gpu_shares(total, actors, each)


def test_the_example_cluster_config_loads_and_validates(data_dir):
    sys.path.insert(0, str(REPO / "experiments"))
    import eto

    from agentloop.config import load_config

    config = load_config(eto.ETOConfig, REPO / "configs" / "eto-cluster.yaml", [f"data_dir={data_dir}"])
    assert (config.rollout.actors, config.rollout.num_gpus, config.policy.backend) == (4, 1.0, "auto")
    assert config.store_url.startswith("postgresql")
    assert gpu_shares(5, config.rollout.actors, config.rollout.num_gpus) == (1.0, 1.0)
