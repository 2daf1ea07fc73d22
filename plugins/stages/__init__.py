"""Built-in stages, each registered under its ``[train] stage`` name: sft; dpo, simpo, orpo, cpo (pairs);
kto (unpaired examples or pairs); rm (a reward model on pairs)."""

from swiftk.plugins.stages import kto, preference, reward, sft

__all__ = ["kto", "preference", "reward", "sft"]
