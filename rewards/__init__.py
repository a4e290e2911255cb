"""align's reward library: a registry of reward functions, built-in rewards, and their weighted combination."""

from .combine import RewardError, RewardSpec, Scores, check_columns, score
from .registry import RewardResult, get_reward, registered, reward, reward_factory

__all__ = ["RewardError", "RewardResult", "RewardSpec", "Scores", "check_columns", "get_reward", "registered",
           "reward", "reward_factory", "score"]
