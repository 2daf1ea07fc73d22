"""Built-in stages, each registered under its ``[train] stage`` name: sft; dpo, simpo, orpo, cpo (pairs);
kto (unpaired examples or pairs); rm (a reward model on pairs); the online ones, which learn from their own
rollouts: grpo and ppo (scored by reward plugins and a reward model), gkd (distilled from a teacher); vlm (a
vision-language model on rows with images); clip (an image and a text encoder trained to agree)."""

from swiftk.plugins.stages import clip, gkd, grpo, kto, ppo, preference, reward, sft, vlm

__all__ = ["clip", "gkd", "grpo", "kto", "ppo", "preference", "reward", "sft", "vlm"]
