"""Generation throughput: transformers' ``generate`` against agentloop's decode engine, same prompts.

Three workloads on one env's tasks (``--env``, Database by default), greedy, 128 new tokens at most
per turn:

  turn        the first turn of N tasks: ``model.generate`` on left-padded batches (the
              baseline), then ``HFPolicy.generate`` (continuous batching). Prints tokens/s,
              the ratio, and how many completions are identical.
  episodes    whole episodes of N tasks through ``rollout``: one ``generate`` call per turn
              for all episodes and no prefix cache (lockstep, the baseline), then the
              policy's own stream (continuous batching, prefix cache across turns).
  stream      the stream alone, as an explore stage runs it (48 episodes at a time), with
              the process's peak PSS and the prefix cache's reuse. Its cache is sized as an
              experiment sizes it (48 episodes x the env's context) unless ``--cache-tokens``
              says otherwise: run it twice to compare sizes. To compare allocators, run it twice, once under
              ``LD_PRELOAD=$(ldconfig -p | grep -o '/.*libjemalloc.so.2')``; to compare
              engines, run this script from a ``git worktree`` of each commit (it imports the
              ``agentloop`` beside it).

Completions only end early once the model has learned the turn format, so pass the adapter
of an SFT stage (``--adapter runs/<run>/adapters/sft``); the base model never stops.

Usage:
  python bench/generation_throughput.py --adapter runs/eto-.../adapters/sft --tasks 64
  python bench/generation_throughput.py --adapter runs/eto-.../adapters/dpo-1 --split train \
      --tasks 250 --workloads stream
  python bench/generation_throughput.py --env webshop --split test --tasks 48 --workloads stream \
      --cache-tokens 65536
  python bench/generation_throughput.py --adapter ... --split train --tasks 48 --workloads stream \
      --dtype float32                            # as a machine without bf16 instructions runs it
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
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workloads", default="turn,episodes", help="any of turn,episodes,stream")
    parser.add_argument("--env", default="db")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 with bf16 instructions, else fp32")
    parser.add_argument("--split", default=None, help="task splits, in order (default: held-out, then train)")
    parser.add_argument(
        "--cache-tokens", type=int, default=-1, help="prefix cache of the stream (-1: 48 x the env's context)"
    )
    args = parser.parse_args()

    import os

    import torch

    from agentloop import envs
    from agentloop.policy.base import PolicyConfig, SamplingConfig
    from agentloop.policy.hf import HFPolicy
    from agentloop.rollout import RolloutConfig, rollout

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = args.data_dir or Path(os.environ.get("AGENTLOOP_DATA_DIR", "data"))
    found = envs.definition(args.env)
    splits = args.split.split(",") if args.split else [found.eval_split, found.train_split]
    tasks = [t for split in splits for t in envs.load_tasks(args.env, data_dir, split)][: args.tasks]
    sampling = SamplingConfig(max_new_tokens=128)
    stream = RolloutConfig(concurrent_episodes=48, max_context_tokens=found.context_tokens, sampling=sampling)

    def make_env(_name):
        return envs.make_env(args.env, tasks, found.config())

    def policy(prefix_cache: bool) -> HFPolicy:
        config = PolicyConfig(model=args.model, dtype=args.dtype, batch_size=args.batch_size, prefix_cache_tokens=0)
        if prefix_cache:  # as an experiment sizes it (fit_lengths), unless told
            config.prefix_cache_tokens = args.cache_tokens
            config.fit_prefix_cache(stream.concurrent_episodes, stream.max_context_tokens)
        p = HFPolicy(config)
        p.load_adapter(args.adapter, version=1 if args.adapter else 0)
        return p

    ours = policy(prefix_cache=True)
    print(
        f"{len(tasks)} {args.env} tasks, batch {args.batch_size}, {torch.get_num_threads()} threads, adapter "
        f"{args.adapter}, prefix cache {ours.config.cache_tokens} tokens, dtype {args.dtype}"
    )

    if "turn" in args.workloads:
        env = make_env(args.env)
        prompts = [ours.chat.user_segment(env.reset(options={"task_id": t.task.task_id})[0], first=True) for t in tasks]
        started = time.perf_counter()
        baseline = generate_batches(ours, prompts, sampling, args.batch_size)
        base_s = time.perf_counter() - started
        started = time.perf_counter()
        engine = [list(g.token_ids) for g in ours.generate(prompts, sampling)]
        ours_s = time.perf_counter() - started
        base_tokens, ours_tokens = sum(map(len, baseline)), sum(map(len, engine))
        same = sum(a == b for a, b in zip(baseline, engine, strict=True))
        print(f"turn      generate   {base_tokens:6d} tokens {base_s:7.1f} s {base_tokens / base_s:6.1f} tok/s")
        print(f"turn      engine     {ours_tokens:6d} tokens {ours_s:7.1f} s {ours_tokens / ours_s:6.1f} tok/s")
        print(f"turn      ratio {base_s / ours_s:.2f}x faster; identical completions {same}/{len(prompts)}")

    if "episodes" in args.workloads:
        config = RolloutConfig(
            concurrent_episodes=max(args.batch_size, len(tasks)),
            max_context_tokens=found.context_tokens,
            sampling=sampling,
        )
        results = {}
        for name, acting in (("lockstep", _Lockstep(policy(prefix_cache=False))), ("stream", ours)):
            _, stats = rollout(
                acting,
                make_env,
                [t.task for t in tasks],
                config,
                source="eval",
                iteration=0,
            )
            results[name] = stats
            print(
                f"episodes  {name:<10} {stats.generated_tokens:6d} tokens {stats.seconds:7.1f} s "
                f"{stats.tokens_per_s:6.1f} tok/s, prefix reuse {stats.prefix_reuse:.0%}"
            )
        print(f"episodes  ratio {results['lockstep'].seconds / results['stream'].seconds:.2f}x faster")

    if "stream" in args.workloads:
        if ours.prefix_cache is not None:
            ours.prefix_cache.clear()  # no entries left from the workloads above
        peak = PeakPSS()
        _, stats = rollout(
            ours,
            make_env,
            [t.task for t in tasks],
            stream,
            source="explore",
            iteration=1,
        )
        print(
            f"stream    {len(tasks)} episodes {stats.generated_tokens:6d} tokens {stats.seconds:7.1f} s "
            f"{stats.tokens_per_s:6.1f} tok/s, prefix reuse {stats.prefix_reuse:.0%}, "
            f"peak PSS {peak.stop() / 2**30:.2f} GiB, LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}"
        )


class PeakPSS:
    """Samples this process's proportional set size every 0.5 s in a thread, from creation to ``stop``."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.peak, self._process, self._done = 0, psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.5):
            self.peak = max(self.peak, self._process.memory_full_info().pss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return max(self.peak, self._process.memory_full_info().pss)


def generate_batches(policy, prompts, sampling, batch_size: int) -> list[list[int]]:
    """The baseline: transformers' ``generate`` on left-padded batches, shortest prompts first."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, list[int]] = {}
    pad = policy.chat.tokenizer.pad_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        # torch 2.13's F.linear on CPU copies the output layer's weight per row when the weight
        # does not require grad, as after a LoRA merge (see agentloop.policy.decode): flag it, so
        # the baseline is transformers at its best. Inference mode keeps the flag without cost.
        head = policy.model.get_output_embeddings().weight
        flag, head.requires_grad = head.requires_grad, True
        with torch.inference_mode():
            rows = policy.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=False,
                eos_token_id=list(policy.chat.stop_ids),
                pad_token_id=pad,
            )
        head.requires_grad = flag
        for row, i in enumerate(chunk):
            out[i] = list(policy._completion(rows[row, width:].tolist(), []).token_ids)
    return [out[i] for i in range(len(prompts))]


class _Lockstep:
    """The policy without its stream: the rollout makes one generation call per turn."""

    def __init__(self, policy) -> None:
        self.chat, self.version, self.generate = policy.chat, policy.version, policy.generate


if __name__ == "__main__":
    main()
