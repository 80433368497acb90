"""Agent-loop throughput against raw vLLM offline throughput on the same prompts and budget.

First the agent loop: vLLM serves ``--adapter`` and plays the held-out DB episodes through
agentloop's rollout (multi-turn, the real environment between turns, ``concurrent_episodes``
in flight, each turn a request joining vLLM's running batch). Every turn's prompt and the
number of tokens it generated are kept. Then the same engine, its prefix cache emptied, gets
all those prompts at once as an offline batch, each generating exactly as many tokens
(``min_tokens = max_tokens``, end-of-turn ignored) with the same batch limit. The ratio of
generated tokens per second, agent loop over offline, is what the multi-turn loop keeps of
the engine's raw speed (target >= 0.85). The offline batch has every prompt from the start;
the agent loop only gets a turn's prompt once the environment has answered the turn before.

Usage:
  python bench/agent_loop_ratio.py --adapter runs/eto-.../adapters/sft --tasks 60
  python bench/agent_loop_ratio.py --adapter runs/eto-.../adapters/sft --split train --tasks 250
"""

from __future__ import annotations

import argparse
import os
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
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--split", default="dev", help="dev: the 60 held-out tasks; train: as many as an explore stage")
    parser.add_argument("--concurrent", type=int, default=48)
    args = parser.parse_args()

    from agentloop import envs
    from agentloop.envs.db import SQLEnvConfig
    from agentloop.policy.base import PolicyConfig, SamplingConfig
    from agentloop.policy.vllm_backend import VLLMPolicy
    from agentloop.rollout import RolloutConfig, rollout

    data_dir = args.data_dir or Path(os.environ.get("AGENTLOOP_DATA_DIR", "data"))
    tasks = envs.load_tasks("db", data_dir, args.split)[: args.tasks]
    sampling = SamplingConfig(max_new_tokens=128)
    policy = VLLMPolicy(PolicyConfig(model=args.model, backend="vllm"))
    policy.load_adapter(args.adapter, 1)
    policy.generate([policy.chat.user_segment("warm up", first=True)] * 4, sampling)  # first-call costs

    def run_loop():
        policy.engine.reset_prefix_cache()
        return rollout(
            policy,
            lambda env: envs.make_env(env, tasks, SQLEnvConfig()),
            [t.task for t in tasks],
            RolloutConfig(concurrent_episodes=args.concurrent, sampling=sampling),
            source="eval",
            iteration=0,
        )

    trajectories, stats = run_loop()
    turns = []  # (prompt, tokens generated) for every assistant turn
    for t in trajectories:
        prompt: list[int] = []
        for m in t.messages:
            if m.role == "assistant":
                turns.append((list(prompt), len(m.token_ids)))
            prompt += m.token_ids
    offline_tokens, offline_s = offline(policy, turns)
    print(
        f"agent loop: {len(trajectories)} episodes, {len(turns)} turns, {stats.generated_tokens} tokens in "
        f"{stats.seconds:.1f} s = {stats.tokens_per_s:.1f} tokens/s"
    )
    print(
        f"offline:    {len(turns)} requests, {offline_tokens} tokens in {offline_s:.1f} s = "
        f"{offline_tokens / offline_s:.1f} tokens/s"
    )
    print(f"ratio agent loop / offline: {stats.tokens_per_s / (offline_tokens / offline_s):.2f} (target >= 0.85)")
    policy.close()


def offline(policy, turns: list[tuple[list[int], int]]) -> tuple[int, float]:
    """All prompts at once through the same engine, each generating its recorded number of tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = policy.engine
    engine.reset_prefix_cache()
    started = time.perf_counter()
    for i, (prompt, n) in enumerate(turns):
        params = SamplingParams(temperature=0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False)
        engine.add_request(f"offline-{i}", TokensPrompt(prompt_token_ids=prompt), params)
    generated = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                generated += len(output.outputs[0].token_ids)
    return generated, time.perf_counter() - started


if __name__ == "__main__":
    main()
