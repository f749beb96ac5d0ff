"""An example third-party vlrm reward plugin."""

from vlrm_example_reward.reward import CaptionLengthReward

__all__ = ["CaptionLengthReward"]
