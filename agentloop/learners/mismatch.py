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

    ``model`` is a causal LM (e.g. a PEFT model with the adapter unmerged), run on the whole
    conversation's token ids, one trajectory per forward pass.
    """
    import torch

    device = next(model.parameters()).device
    out = []
    for t in trajectories:
        ids = [i for m in t.messages for i in m.token_ids]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        logprobs = logits.log_softmax(-1)
        turns, start = [], 0
        for m in t.messages:
            end = start + len(m.token_ids)
            if m.role == "assistant" and m.logprobs:
                targets = torch.tensor(m.token_ids, device=device)
                rows = logprobs[start - 1 : end - 1]  # position p predicts token p + 1
                turns.append(
                    TurnScores(
                        tuple(rows.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()),
                        tuple((rows.argmax(-1) == targets).tolist()),
                    )
                )
            start = end
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
