"""DeepSpeed ZeRO-2/3: ``deepspeed.initialize`` takes the model and the plugin-built optimizer and owns backward,
clipping, the step and its own checkpoint partitions. Precision stays ours (autocast over fp32 master weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from swiftk.contracts.engines import TrainPlan
from swiftk.kernel.dist import DistInfo
from swiftk.kernel.parallel.none import OneProcess


class DeepSpeedZero(OneProcess):
    """A frozen model beside the trained one stays a plain copy on each rank (a ZeRO engine needs an optimizer)."""

    name = "deepspeed"

    def __init__(self, info: DistInfo | None = None, options: Any = None) -> None:
        super().__init__(info, options)
        self.engine: Any = None  # the DeepSpeed engine, once attached
        self.micro_steps = 0

    @classmethod
    def problems(cls, options: Any) -> list[str]:
        problems = []
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            problems.append(f"[distributed] backend: 'deepspeed' but DeepSpeed is not installed here ({exc}); "
                            f"install it with `DS_BUILD_OPS=0 pip install 'swiftk[deepspeed]'`, or use "
                            f"backend = 'ddp' or 'fsdp'")
        if options.deepspeed_config:
            path = Path(options.deepspeed_config)
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except OSError:
                problems.append(f"[distributed] deepspeed_config: {path} does not exist")
            except json.JSONDecodeError as exc:
                problems.append(f"[distributed] deepspeed_config: {path}:{exc.lineno}: not valid JSON: {exc.msg}")
        return problems

    @property
    def sharded(self) -> bool:
        return self.zero_stage == 3

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage()) if self.engine is not None else 0

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainPlan) -> torch.nn.Module:
        """``deepspeed.initialize`` with the plugin-built optimizer (our scheduler keeps stepping it)."""
        import deepspeed

        config = deepspeed_config(self.options, train, self.info.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config,
                                                    dist_init_required=False)
        return self.engine  # type: ignore[no-any-return]

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return getattr(model, "module", model)  # type: ignore[no-any-return]

    # --- one optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(self.scaled(loss), scale_wrt_gas=False)
        self.micro_steps += 1
        if self.micro_steps % self.engine.gradient_accumulation_steps():
            self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step

    def clip_grad_norm(self, params: list[torch.nn.Parameter], max_norm: float | None) -> float | None:
        return None  # DeepSpeed clips inside its step

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: float | None) -> float:
        """DeepSpeed's step; returns the gradient norm that step measured (and clipped with)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: DeepSpeed's step already zeroed the gradients, and the plugin-built optimizer it wraps holds
        ZeRO's own fp32 partitions, whose gradient buffers must stay (with optimizer offload, ZeRO copies each
        step's gradients into them)."""

    # --- checkpoints

    def full_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """ZeRO-3: the partitions gathered whole (a collective); ZeRO-2: every rank has whole parameters."""
        if not self.sharded:
            return super().full_weights(model)
        import deepspeed

        base = self.unwrap(model)
        params = [p for p in base.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().cpu().clone() for n, p in base.named_parameters() if p.requires_grad}

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {}  # in the ZeRO partitions (``save_shards``)

    def save_shards(self, folder: Path) -> None:
        """Each rank's RNG state and its ZeRO partitions (``deepspeed/``)."""
        super().save_shards(folder)
        self.engine.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path) -> None:
        self.engine.load_checkpoint(str(path), tag="deepspeed", load_module_strict=False,
                                    load_lr_scheduler_states=False)


def deepspeed_config(options: Any, train: TrainPlan, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: ``deepspeed_config``'s JSON if given, with the batch and clipping from [train]
    (one source of truth); else built from ``zero_stage`` and the offload switches. Precision stays ours
    (autocast over fp32 master weights), so DeepSpeed's own bf16/fp16 stay off unless the JSON turns them on."""
    config: dict[str, Any] = {}
    if options.deepspeed_config:
        config = json.loads(Path(options.deepspeed_config).read_text(encoding="utf-8"))
    zero = config.setdefault("zero_optimization", {})
    if options.zero_stage is not None or "stage" not in zero:
        zero["stage"] = options.zero_stage or 2
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if options.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config.update({
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world_size,
        "gradient_clipping": train.max_grad_norm or 0.0,
    })
    config.setdefault("zero_allow_untested_optimizer", True)  # the optimizer is a plugin's
    config.setdefault("zero_force_ds_cpu_optimizer", False)  # offload with a torch optimizer: slower, but allowed
    config.setdefault("steps_per_print", sys.maxsize)
    return config
