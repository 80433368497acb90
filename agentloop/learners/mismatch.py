"""Train/rollout mismatch: the serving engine's log-probs against the learner's, same tokens.

A rollout backend records, for every generated token, its log-probability under the model
it served (``Message.logprobs``). The learner scores the same tokens with its own model: the
base weights with the adapter unmerged, in its own dtype and kernels. Where the two differ,
the learner trains on data that is slightly off its policy; a gap that flips greedy actions
or is large against DPO's log-ratio margins would bias training silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from agentloop.types import Trajectory


@dataclass(frozen=True)
class TurnScores:
    """The learner's view of one generated turn: each token's log-prob and whether it was the argmax."""

    logprobs: tuple[float, ...]
    argmax: tuple[bool, ...]


def learner_scores(model, trajectories: Sequence[Trajectory]) -> list[list[TurnScores]]:
    """For each trajectory, the learner's scores of its assistant turns that carry recorded log-probs.

    ``model`` is a causal LM (e.g. a PEFT model with the adapter unmerged: its LoRA layers sit
    inside the base model's modules), run on the whole conversation's token ids, one
    trajectory per forward pass; the output layer runs only where a scored token is predicted.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, softcap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)
    device = next(model.parameters()).device
    out = []
    for t in trajectories:
        ids = [i for m in t.messages for i in m.token_ids]
        spans, start = [], 0
        for m in t.messages:
            if m.role == "assistant" and m.logprobs and start > 0:
                spans.append((start, start + len(m.token_ids)))
            start += len(m.token_ids)
        if not spans:
            out.append([])
            continue
        with torch.inference_mode():
            hidden = base.get_decoder()(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0]
            rows = torch.cat([torch.arange(a - 1, b - 1) for a, b in spans]).to(device)  # p predicts p + 1
            logits = head(hidden[rows]).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            logprobs = logits.log_softmax(-1)
        targets = torch.tensor([ids[p + 1] for p in rows.tolist()], device=device)
        picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        best = (logprobs.argmax(-1) == targets).tolist()
        turns, offset = [], 0
        for a, b in spans:
            n = b - a
            turns.append(TurnScores(tuple(picked[offset : offset + n]), tuple(best[offset : offset + n])))
            offset += n
        out.append(turns)
    return out


def mismatch_metrics(trajectories: Sequence[Trajectory], scores: Sequence[Sequence[TurnScores]]) -> dict[str, float]:
    """Per-token |Δ log p| (mean, p99, max), how often the learner's argmax is not the token the
    engine chose (for greedy rollouts: a flipped action), and the mean |Δ| of turn sums."""
    deltas, flips, turn_gaps = [], 0, []
    for t, turns in zip(trajectories, scores, strict=True):
        recorded = [m for m in t.messages if m.role == "assistant" and m.logprobs]
        for m, s in zip(recorded, turns, strict=True):
            gap = [abs(a - b) for a, b in zip(m.logprobs, s.logprobs, strict=True)]
            deltas += gap
            flips += sum(not a for a in s.argmax)
            turn_gaps.append(abs(sum(m.logprobs) - sum(s.logprobs)))
    if not deltas:
        return {}
    ordered = sorted(deltas)
    return {
        "tokens": float(len(deltas)),
        "mean_abs_dlogp": sum(deltas) / len(deltas),
        "p99_abs_dlogp": ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)],
        "max_abs_dlogp": ordered[-1],
        "argmax_differs": flips / len(deltas),
        "turn_sum_abs_dlogp": sum(turn_gaps) / len(turn_gaps),
    }
