"""The reward `environment`: each sample's own environment instance scores its completion (multi-turn rollouts with
`tools.environment`, align/rollout/tools.py). The rollout hands the instances over as the column `environment`."""

from __future__ import annotations

from .calling import RewardError
from .registry import reward


@reward("environment")
def environment(prompts, completions, environment=None, **_) -> list:
    if environment is None:
        raise RewardError("reward 'environment' scores with the rollout's environments: set tools.environment to a "
                          "class with a reward(completion) method")
    return [env.reward(c) for env, c in zip(environment, completions)]


environment.required_columns = []  # the rollout adds the column; prompt files never have it
