"""Registers the example reward with vlrm through the `vlrm` entry-point group."""

from vlrm import hookimpl
from vlrm_example_reward.reward import CaptionLengthReward


@hookimpl
def vlrm_register_rewards():
    return {"caption_length": CaptionLengthReward}
