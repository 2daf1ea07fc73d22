"""Tuners that train every weight of the model in place (fp32 master weights).

  full     every weight trains, with the [train] optimizer (AdamW state for each)
  galore   every weight trains; the optimizer keeps low-rank state (Zhao et al. 2024, see
           plugins/optimizers/galore.py), so the galore_* keys become the galore_adamw optimizer's arguments
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field, field_validator, model_validator

from swiftk.contracts.tuners import Tuner, TunerConfig, TunerError, register_tuner
from swiftk.plugins.tuners.lora import target_names


@register_tuner("full")
class Full(Tuner):
    """Every parameter trains."""

    full_weights_master = True

    def apply(self, model: torch.nn.Module, train: Any, *, reward_head: bool) -> torch.nn.Module:
        model.requires_grad_(True)
        return model


class GaLoreConfig(TunerConfig):
    """[train] keys of galore: the projection of the gradients the galore_adamw optimizer keeps state for."""

    galore_rank: int = Field(128, ge=1, description="galore: rank of the projected gradients")
    galore_update_proj_gap: int = Field(
        200, ge=1, validation_alias=AliasChoices("galore_update_proj_gap", "galore_update_interval"),
        description="galore: steps between projector refreshes (an SVD of each targeted gradient)")
    galore_scale: float = Field(0.25, gt=0, description="galore: scale of the projected-back update")
    galore_proj_type: Literal["std", "reverse_std", "left", "right", "full"] = "std"
    galore_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", validation_alias=AliasChoices("galore_target_modules", "galore_target"),
        description="galore: matrices whose names contain one of these are projected; 'all-linear': every "
                    "matrix but embeddings and the head")

    @field_validator("galore_target_modules", mode="before")
    @classmethod
    def _target_names(cls, value: Any) -> Any:
        return target_names(value)

    @model_validator(mode="after")
    def _galore_optimizer(self) -> GaLoreConfig:
        # In the assembled [train] table the optimizer is shown as it will be built; alone, there is none.
        if "optimizer" in type(self).model_fields:
            self.optimizer, self.optimizer_config = galore_optimizer(self)
        return self


@register_tuner("galore")
class GaLore(Full):
    """Every parameter trains under the galore_adamw optimizer, with the galore_* keys as its arguments."""

    config = GaLoreConfig


def galore_optimizer(train: Any) -> tuple[str, dict[str, Any]]:
    """``("galore_adamw", arguments)``: the galore_* keys, overridden by any the [train] optimizer_config sets."""
    if train.optimizer not in ("adamw", "galore_adamw"):
        raise TunerError(f"tuner_strategy 'galore' trains with the galore_adamw optimizer; remove optimizer "
                         f"= '{train.optimizer}' (or pick another tuner_strategy)")
    galore = {"rank": train.galore_rank, "update_proj_gap": train.galore_update_proj_gap,
              "scale": train.galore_scale, "proj_type": train.galore_proj_type,
              "target_modules": train.galore_target_modules}
    return "galore_adamw", {**galore, **train.optimizer_config}
