"""The backends side by side: throughput on the same episodes, and train/rollout mismatch.

Each backend serves the same adapter (merged into bf16 weights, as the rollout serves it) and
plays the same held-out DB episodes greedily: ``vllm``, ``transformers`` (agentloop's decode
engine) and ``generate`` (transformers' own ``generate`` on left-padded batches, one call per
round of turns: the baseline without continuous batching or a prefix cache). The first two
record every generated token's log-prob while sampling.
The learner's model (base weights with the adapter unmerged, through PEFT, in bf16 as the
learner trains and in fp32 as a reference) then scores the same tokens. Printed per backend
and learner dtype: mean, p99 and max |Δ log p| per token, how often the learner's argmax is
not the token the backend chose (a flipped greedy action), the mean |Δ| of a turn's sum,
and the ratio of each mean |Δ| to the transformers backend's against the same learner.

Usage:
  python bench/mismatch.py --adapter runs/eto-.../adapters/dpo-2 --tasks 30
  python bench/mismatch.py --adapter runs/eto-.../adapters/sft --backends generate,transformers,vllm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=None, help="task data (default: AGENTLOOP_DATA_DIR)")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--tasks", type=int, default=30)
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--learner-dtypes", default="bfloat16,float32")
    args = parser.parse_args()

    import os

    import torch

    from agentloop import envs
    from agentloop.envs.db import SQLEnvConfig
    from agentloop.learners.mismatch import learner_scores, mismatch_metrics
    from agentloop.policy import make_policy
    from agentloop.policy.base import PolicyConfig, SamplingConfig
    from agentloop.policy.model import resolve_model
    from agentloop.rollout import RolloutConfig, rollout

    data_dir = args.data_dir or Path(os.environ.get("AGENTLOOP_DATA_DIR", "data"))
    tasks = envs.load_tasks("db", data_dir, "dev")[: args.tasks]
    rollout_config = RolloutConfig(concurrent_episodes=48, sampling=SamplingConfig(max_new_tokens=128))
    played = {}
    for backend in args.backends.split(","):
        started = time.perf_counter()
        engine = "transformers" if backend == "generate" else backend  # generate drives the same model
        policy = make_policy(PolicyConfig(model=args.model, backend=engine))
        policy.load_adapter(args.adapter, 1)
        trajectories, stats = rollout(
            _Generate(policy) if backend == "generate" else policy,
            lambda env: envs.make_env(env, tasks, SQLEnvConfig()),
            [t.task for t in tasks],
            rollout_config,
            source="eval",
            iteration=0,
        )
        getattr(policy, "close", lambda: None)()
        del policy
        played[backend] = trajectories
        successes = sum(t.success for t in trajectories)
        print(
            f"{backend}: {successes}/{len(trajectories)} solved, {stats.generated_tokens} tokens, "
            f"{stats.tokens_per_s:.1f} tokens/s, {time.perf_counter() - started:.0f} s with start-up",
            flush=True,
        )

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = []
    for dtype in args.learner_dtypes.split(","):
        base = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=getattr(torch, dtype))
        learner = PeftModel.from_pretrained(base, str(args.adapter)).eval()
        for backend, trajectories in played.items():
            rows.append((backend, dtype, mismatch_metrics(trajectories, learner_scores(learner, trajectories))))
        del learner, base

    rows = [row for row in rows if row[2]]  # generate records no log-probs
    baseline = {dtype: m["mean_abs_dlogp"] for backend, dtype, m in rows if backend == "transformers"}
    print(
        f"\n{'backend':<13}{'learner':<10}{'tokens':>7}{'mean':>9}{'p99':>9}{'max':>9}{'argmax':>8}{'turn':>8}{'ratio':>7}"
    )
    for backend, dtype, m in rows:
        ratio = m["mean_abs_dlogp"] / baseline[dtype] if dtype in baseline and baseline[dtype] else float("nan")
        print(
            f"{backend:<13}{dtype:<10}{m['tokens']:>7.0f}{m['mean_abs_dlogp']:>9.4f}{m['p99_abs_dlogp']:>9.4f}"
            f"{m['max_abs_dlogp']:>9.4f}{m['argmax_differs']:>8.2%}{m['turn_sum_abs_dlogp']:>8.3f}{ratio:>7.2f}"
        )


class _Generate:
    """An agentloop policy's model behind transformers' ``generate``: one padded call per round of turns."""

    def __init__(self, policy) -> None:
        self.policy, self.chat, self.version = policy, policy.chat, policy.version

    def generate(self, prompts, sampling):
        from generation_throughput import generate_batches

        batch = generate_batches(self.policy, prompts, sampling, self.policy.config.batch_size)
        return [self.policy._completion(ids, []) for ids in batch]


if __name__ == "__main__":
    main()
