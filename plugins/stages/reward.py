"""Reward modelling: a sequence classifier with one score head learns to score the chosen answer above the
rejected one (Bradley-Terry, plugins/losses/reward.py). Held out: the pair loss and its accuracy."""

from __future__ import annotations

from swiftk.contracts.stages import register_stage
from swiftk.plugins.stages.preference import PairStage


@register_stage("rm")
class RewardModel(PairStage):
    """Pairs in, a scalar score per sequence out; the loss's options (margin, center_rewards_coefficient) go in
    ``loss_config``."""

    config = None
    reward_head = True
    writes_text = False  # a reward model scores text, it does not write any

