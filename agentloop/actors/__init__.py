"""Ray actors: the rollout worker and the learner. ``import ray`` lives here and above only."""
