"""Learner throughput: plain TRL against agentloop's learners, side by side on the same data.

Each variant trains in its own subprocess (so peak memory is its own) on the same
multi-turn, database-style conversations, tokenized turn by turn with the model's own
tokenizer. It prints tokens per second of training, the ratio to plain TRL and the
process's peak resident memory.

SFT variants:
  sft-trl   TRL's SFTTrainer as is: padded batches, the loss masked to assistant tokens
            through the ``assistant_masks`` column, TRL's fused output layer (on CPU it
            scores every position).
  sft-ours  ``train_sft`` defaults: padding-free batches and the output layer run only on
            trained positions (``logits_on_assistant_only``).
  sft-trl-pf, sft-ours-padded   The two changes one at a time, to see what each is worth.
DPO variants (the same pairs, fed pre-tokenized with the environment turns masked out of
the log-probabilities; TRL cannot take such data without the two thin subclasses):
  dpo-trl   TRL's log-probabilities as is: its fused output layer on every position, and a
            reference forward on every step (TRL's default).
  dpo-ours  ``train_dpo`` defaults: the output layer on assistant tokens only, reference
            log-probs computed once before training.
  dpo-ours-online   The output-layer change alone (reference forward on every step).

Usage:
  python bench/learner_throughput.py --model gemma3-270m --threads 2
  python bench/learner_throughput.py --variants sft-trl,sft-ours --conversations 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentloop.types import Message, Task, Trajectory  # noqa: E402

logger = logging.getLogger("bench.learner_throughput")

VARIANTS = ("sft-trl", "sft-trl-pf", "sft-ours-padded", "sft-ours", "dpo-trl", "dpo-ours-online", "dpo-ours")
BASELINES = {"sft": "sft-trl", "dpo": "dpo-trl"}

INSTRUCTION = (
    "You are an agent that answers questions about a database table by talking to a MySQL server. "
    "Think about the question first, then act. To run SQL, reply with 'Action: Operation' followed by "
    "one statement in a ```sql code block```; the server's output comes back in the next message. "
    "Run one statement per turn, keep it on one line, and do not add comments. When you know the answer, "
    "reply with 'Action: Answer' and then 'Final Answer: [...]' holding a list of the values. For an "
    "INSERT, UPDATE or DELETE task, answer with 'Final Answer: [\"none\"]' once the statement has run. "
    "If an error comes back, read it and fix your statement."
)


GUESSES = ("1", "yes", "unknown")


def operation(sql: str) -> str:
    """An assistant's SQL action in the AgentBench DB format."""
    return f"Action: Operation\n```sql\n{sql}\n```"


def conversation(task: dict, index: int) -> Trajectory:
    """A plausible successful DB episode (2-3 assistant turns) built from a dbbench task."""
    table = task["table"]
    name = table["table_name"]
    rows = [tuple(r) for r in table["table_info"]["rows"]]
    query = (task.get("sql") or {}).get("query") or task["label"][0]
    label = task["label"] if task.get("sql") else ["none"]
    messages = [
        Message("user", f"{INSTRUCTION}\n\n{task['description']}\n{task['add_description']}"),
        Message(
            "assistant", f"Thought: I should look at a few rows first.\n{operation(f'SELECT * FROM `{name}` LIMIT 3;')}"
        ),
        Message("user", str(rows[:3])),
        Message("assistant", f"Thought: Now I can write the statement.\n{operation(query)}"),
        Message("user", str([tuple(label)]) if task.get("sql") else "[]"),
        Message("assistant", f"Thought: That is the result.\nAction: Answer\nFinal Answer: {json.dumps(label)}"),
    ]
    return Trajectory(
        task=Task("db", f"bench-{index}", "train", "SELECT", task["description"]),
        messages=tuple(messages),
        tokenizer="",
        reward=1.0,
        success=True,
        terminated=True,
        truncated=False,
        num_turns=3,
        invalid_actions=0,
        source="expert",
        policy_version=-1,
        iteration=0,
    )


def failed_variant(expert: Trajectory, rng: random.Random) -> Trajectory:
    """An explored trajectory of the same task that fails: a wrong query, an error, a wrong answer."""
    first = expert.messages[0]
    messages = (
        first,
        Message("assistant", f"Thought: I will query the table directly.\n{operation('SELECT answer FROM table;')}"),
        Message("user", "Error: (1146, \"Table 'db.table' doesn't exist\")"),
        Message(
            "assistant", f"Thought: I will guess.\nAction: Answer\nFinal Answer: {json.dumps([rng.choice(GUESSES)])}"
        ),
    )
    return replace(expert, messages=messages, reward=0.0, success=False, source="explore", num_turns=2)


def load_tasks(data_dir: Path, n: int) -> list[dict]:
    """The first ``n`` dbbench tasks whose table fits in a short conversation."""
    path = data_dir / "dbbench" / "standard.jsonl"
    tasks = [json.loads(line) for line in path.read_text().splitlines()]
    return [t for t in tasks if len(str(t["table"]["table_info"]["rows"][:3])) < 600][:n]


def run_variant(args: argparse.Namespace) -> dict[str, float]:
    """Trains one variant in this process and returns its measurements."""
    import torch

    from agentloop.learners.data import build_pairs
    from agentloop.policy.model import resolve_model

    torch.set_num_threads(args.threads)
    base = Path(resolve_model(args.model))
    rng = random.Random(0)
    experts = [conversation(t, i) for i, t in enumerate(load_tasks(args.data_dir, args.conversations))]
    kind, _, flavour = args.run.partition("-")
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "sft":
            metrics = _run_sft(base, experts, flavour, args, Path(tmp))
        else:
            pairs = build_pairs(experts, [failed_variant(e, rng) for e in experts], iteration=1)
            metrics = _run_dpo(base, pairs, flavour, args, Path(tmp))
    metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return metrics


def _run_sft(base: Path, experts: list[Trajectory], flavour: str, args: argparse.Namespace, tmp: Path) -> dict:
    from agentloop.learners.sft import SFTLearnerConfig, train_sft

    config = SFTLearnerConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accumulation=args.grad_accumulation,
        logits_on_assistant_only=flavour in ("ours", "ours-padded"),
        padding_free=flavour in ("ours", "trl-pf"),
    )
    metrics = train_sft(base, experts, config, tmp / "adapter")
    return {
        "tokens_per_s": metrics["sft/tokens_per_s"],
        "loss": metrics["sft/loss"],
        "train_s": metrics["timing/sft_train"],
        "tokens": metrics["sft/train_tokens"],
        "assistant_tokens": metrics["sft/assistant_tokens"],
    }


def _run_dpo(base: Path, pairs: list, flavour: str, args: argparse.Namespace, tmp: Path) -> dict:
    from agentloop.learners.dpo import DPOLearnerConfig, train_dpo
    from agentloop.learners.sft import SFTLearnerConfig, train_sft

    # An adapter to continue from, as in an ETO round (one tiny SFT step: the speed does not depend on it)
    sft = SFTLearnerConfig(epochs=1, batch_size=2, grad_accumulation=1)
    train_sft(base, [p.chosen for p in pairs[:2]], sft, tmp / "sft")
    config = DPOLearnerConfig(
        epochs=args.epochs,
        batch_size=max(1, args.batch_size // 2),
        grad_accumulation=args.grad_accumulation,
        logits_on_assistant_only=flavour.startswith("ours"),
        precompute_ref_log_probs=flavour == "ours",
    )
    metrics = train_dpo(base, tmp / "sft", pairs, config, tmp / "dpo")
    return {
        "tokens_per_s": metrics["dpo/tokens_per_s"],
        "loss": metrics["dpo/loss"],
        "train_s": metrics["timing/dpo_train"],
        "tokens": metrics["dpo/train_tokens"],
        "pairs": metrics["dpo/pairs"],
    }


def spawn(variant: str, args: argparse.Namespace) -> dict:
    """Runs one variant in a fresh Python process and returns its JSON result."""
    command = [
        sys.executable,
        __file__,
        "--run",
        variant,
        "--model",
        args.model,
        "--threads",
        str(args.threads),
        "--conversations",
        str(args.conversations),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--grad-accumulation",
        str(args.grad_accumulation),
        "--data-dir",
        str(args.data_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"variant {variant} failed")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    return result


def report(results: dict[str, dict]) -> None:
    """Prints one line per variant with its ratio to the plain-TRL baseline of its kind."""
    print(f"{'variant':16} {'tokens/s':>9} {'ratio':>6} {'train s':>8} {'loss':>7} {'peak RSS GB':>11}")
    for variant, r in results.items():
        base = results.get(BASELINES[variant.split("-")[0]])
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        line = f"{variant:16} {r['tokens_per_s']:9.1f} {ratio:6.2f} {r['train_s']:8.1f} {r['loss']:7.4f}"
        print(f"{line} {r['peak_rss_gb']:11.2f}")


def main() -> None:
    """Parses arguments, then runs one variant (``--run``) or all requested ones side by side."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m", help="a checkpoint directory or 'gemma3-270m'")
    parser.add_argument("--variants", default="sft-trl,sft-ours,dpo-trl,dpo-ours")
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per forward (DPO: pairs = half)")
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    data_dir = Path(os.environ.get("AGENTLOOP_DATA_DIR", REPO.parent / "shared" / "data"))
    parser.add_argument("--data-dir", type=Path, default=data_dir)
    parser.add_argument("--run", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_variant(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = {}
    for variant in args.variants.split(","):
        logger.info("running %s", variant)
        results[variant] = spawn(variant, args)
        logger.info("%s: %s", variant, results[variant])
    report(results)


if __name__ == "__main__":
    main()
