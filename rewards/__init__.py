"""align's reward library: a registry of reward functions and their weighted combination."""

from .combine import RewardError, RewardSpec, Scores, score
from .registry import get_reward, registered, reward

__all__ = ["RewardError", "RewardSpec", "Scores", "get_reward", "registered", "reward", "score"]
