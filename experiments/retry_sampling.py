"""How a policy's retries come out under other sampling settings, without running a round.

    python experiments/retry_sampling.py RUN_DIR [--adapter RUN_DIR/adapters/sft] [--stage explore/1] [--n 40] \
        [--setting 0 --setting 0.7 --setting 0.7,min_p=0.1 ...]

Takes the first prompts of a stage's retries (trial 1, the first ``--n`` stored) and generates their
first turn again with the given adapter (the policy that explored; the base model without one), once
per setting, with the prompt as stored (memory first) and with the memory taken out (the task's own
prompt). A setting is a temperature, then optional ``top_p=`` and ``min_p=``. Prints, per setting
and prompt, how many turns ended (the stop token within the rollout's budget of new tokens) and how
many read as an action of their env (DB, OS, WebShop; ALFWorld's actions are checked against the game, so only ends are
counted). A small policy's turn can run on past its action when sampled: this says whether the
temperature, the tail of the distribution or the memory makes it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agentloop.policy.base import PolicyConfig, SamplingConfig
from agentloop.replay import ReplayStore
from agentloop.types import Trajectory


def action_reader(env: str) -> Callable[[Any, int], Any] | None:
    """The env's own parser of a reply (None where an action's validity depends on the game)."""
    if env == "db":
        from agentloop.envs.db.env import parse_action
    elif env == "os":
        from agentloop.envs.os.env import parse_action
    elif env == "webshop":
        from agentloop.envs.webshop.pages import parse_action
    else:
        return None
    return parse_action


def setting(text: str) -> SamplingConfig:
    """``0.7,min_p=0.1`` -> a sampling config (the budget and seed are set later)."""
    temperature, *rest = text.split(",")
    extra = {key: float(value) for key, value in (item.split("=", 1) for item in rest)}
    unknown = set(extra) - {"top_p", "min_p"}
    if unknown:
        raise SystemExit(f"--setting {text!r}: only top_p= and min_p= may follow, not {sorted(unknown)}")
    sampling = SamplingConfig(temperature=float(temperature), **extra)
    sampling.validate()
    return sampling


def retries(run_dir: Path, stage: str, n: int) -> list[Trajectory]:
    with ReplayStore(f"sqlite:///{run_dir / 'replay.db'}") as store:
        found = [t for t in store.trajectories(stage=stage) if t.trial == 1 and t.memory]
    return found[:n]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--adapter", type=Path, help="the policy that explored the stage (default: the base model)")
    parser.add_argument("--stage", default="explore/1")
    parser.add_argument("--n", type=int, default=40, help="retry prompts (trial 1), the first stored")
    parser.add_argument("--setting", action="append", type=setting, help="temperature[,top_p=P][,min_p=P]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from agentloop.policy.hf import HFPolicy

    config = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    found = retries(args.run_dir, args.stage, args.n)
    if not found:
        raise SystemExit(f"{args.run_dir}: no retry with memory in {args.stage}")
    budget = config["rollout"]["sampling"]["max_new_tokens"]
    policy_config = config["policy"]
    policy = HFPolicy(PolicyConfig(model=policy_config["model"], dtype=policy_config["dtype"], prefix_cache_tokens=0))
    if args.adapter is not None:
        policy.load_adapter(args.adapter, 1)
    prompts = {"with memory": [], "without memory": []}
    for t in found:
        first = t.messages[0].content
        assert first.startswith(t.memory), f"{t.task.key}: the first message does not begin with the memory"
        prompts["with memory"].append(policy.chat.user_segment(first, first=True))
        prompts["without memory"].append(policy.chat.user_segment(first[len(t.memory) :].lstrip("\n"), first=True))
    envs = [t.task.env for t in found]
    print(f"{len(found)} retry prompts of {args.stage} in {args.run_dir}; first turns of at most {budget} tokens")
    print("| setting | prompt | ended its turn | read as an action | mean tokens |")
    print("|---|---|---|---|---|")
    for sampling in args.setting or [setting("0"), setting("0.7")]:
        sampling.max_new_tokens, sampling.seed = budget, args.seed
        name = f"T={sampling.temperature:g}"
        name += f", top_p={sampling.top_p:g}" if sampling.top_p < 1 else ""
        name += f", min_p={sampling.min_p:g}" if sampling.min_p > 0 else ""
        for which, batch in prompts.items():
            turns = policy.generate(batch, sampling)
            ended = sum(g.finished for g in turns)
            readable = [
                not isinstance(reader(g.text, config[env]["max_action_chars"]), str)
                for g, env in zip(turns, envs, strict=True)
                if (reader := action_reader(env)) is not None
            ]
            valid = f"{sum(readable)}/{len(readable)}" if readable else "-"
            tokens = sum(len(g.token_ids) for g in turns) / len(turns)
            print(f"| {name} | {which} | {ended}/{len(turns)} | {valid} | {tokens:.0f} |", flush=True)


if __name__ == "__main__":
    main()
