"""How long each environment's episodes are in tokens: the basis of its registered lengths.

For every env given (default: all registered), builds the expert demonstrations of a sample of
its training tasks with the default settings, tokenizes them turn by turn with the default
model's tokenizer, and prints the distribution of their lengths and how many would be cut at
a few learner ``max_length`` values. An env's ``EnvDefinition.median_episode_tokens`` and
``context_tokens`` come from this table.

Usage:
    python bench/episode_tokens.py [ENV ...] [--tasks N] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from agentloop import envs

CUTS = (1024, 2048, 4096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("envs", nargs="*", help="environments (default: all registered)")
    parser.add_argument("--tasks", type=int, default=200, help="training tasks sampled per env (0 = all)")
    parser.add_argument("--model", default="gemma3-270m")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from agentloop.policy.chat import ChatTokenizer
    from agentloop.policy.model import resolve_model

    chat = ChatTokenizer(AutoTokenizer.from_pretrained(resolve_model(args.model)))
    data_dir = Path(os.environ.get("AGENTLOOP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    print(
        f"{'env':10} {'demos':>6} {'median':>7} {'p90':>6} {'max':>6} " + " ".join(f"{'>' + str(c):>6}" for c in CUTS)
    )
    for name in args.envs or envs.names():
        found = envs.definition(name)
        tasks = envs.load_tasks(name, data_dir, found.train_split)
        step = max(1, len(tasks) // args.tasks) if args.tasks else 1
        tasks = tasks[::step][: args.tasks or None]
        expert = None if found.expert_config is None else found.expert_config()
        started = time.perf_counter()
        demos, _ = envs.build_experts(name, tasks, found.config(), expert, seed=0)
        lengths = sorted(len(chat.tokenize(d).token_ids) for d in demos)
        if not lengths:
            print(f"{name:10} no demonstration", file=sys.stderr)
            continue
        p90 = lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))]
        over = " ".join(f"{sum(n > c for n in lengths):>6}" for c in CUTS)
        print(
            f"{name:10} {len(lengths):>6} {statistics.median(lengths):>7.0f} {p90:>6} {lengths[-1]:>6} {over}"
            f"   ({len(tasks)} tasks, {time.perf_counter() - started:.0f} s)"
        )


if __name__ == "__main__":
    main()
