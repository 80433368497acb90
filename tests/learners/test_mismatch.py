"""The learner scores the very tokens a backend generated, aligned turn by turn."""

from __future__ import annotations

from dataclasses import replace

from agentloop.learners.mismatch import learner_scores, mismatch_metrics
from agentloop.policy.base import PolicyConfig, SamplingConfig
from agentloop.policy.hf import HFPolicy
from agentloop.types import Message, Task, Trajectory


def _conversation(policy: HFPolicy, turns: int) -> Trajectory:
    """A multi-turn conversation generated greedily, each turn's log-probs recorded."""
    sampling = SamplingConfig(max_new_tokens=6)
    messages = [Message("user", "hi", tuple(policy.chat.user_segment("hi", first=True)))]
    for turn in range(turns):
        gen = policy.generate([[i for m in messages for i in m.token_ids]], sampling)[0]
        messages.append(Message("assistant", gen.text, gen.token_ids, gen.logprobs, gen.version))
        said = f"Observation {turn}"
        messages.append(Message("user", said, tuple(policy.chat.user_segment(said, first=False))))
    return Trajectory(
        task=Task("db", "t-1", "dev", "k", "hi"),
        messages=tuple(messages),
        tokenizer=policy.chat.name,
        reward=0.0,
        success=False,
        terminated=False,
        truncated=True,
        num_turns=turns,
        invalid_actions=0,
        source="eval",
        policy_version=0,
        iteration=0,
        generated_tokens=0,
    )


def test_the_same_model_agrees_with_what_it_recorded_and_a_shift_does_not(tiny_model_dir):
    policy = HFPolicy(PolicyConfig(model=str(tiny_model_dir), dtype="float32"))
    trajectories = [_conversation(policy, 3)]
    metrics = mismatch_metrics(trajectories, learner_scores(policy.model, trajectories))
    assert metrics["tokens"] == sum(len(m.token_ids) for m in trajectories[0].messages if m.role == "assistant")
    assert metrics["max_abs_dlogp"] < 1e-4 and metrics["argmax_differs"] == 0.0  # greedy: the argmax each time
    # Records shifted by one token (an off-by-one in either side) are far off.
    shifted = [
        replace(
            trajectories[0],
            messages=tuple(
                replace(m, logprobs=m.logprobs[1:] + m.logprobs[:1]) if m.logprobs else m
                for m in trajectories[0].messages
            ),
        )
    ]
    assert mismatch_metrics(shifted, learner_scores(policy.model, shifted))["mean_abs_dlogp"] > 1e-3
