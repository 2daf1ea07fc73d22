"""DeepSpeed ZeRO-2/3: ``deepspeed.initialize`` takes the model and the plugin-built optimizer and owns backward,
clipping, the step and its own checkpoint partitions. Precision stays ours (autocast over fp32 master weights).

Across layouts, DeepSpeed's universal checkpoint (a folder per parameter, its fp32 weight and optimizer state whole)
is the pivot. DeepSpeed's own converter makes a checkpoint's partitions whole once (``made_whole``): any other engine
reads those tensors (``whole_state``), and a DeepSpeed run of the same stage loads the folder with DeepSpeed's
universal loader. For another stage's partitions, or another engine's checkpoint, a folder in this stage's layout is
written from the whole tensors (``universal_for``) and loaded the same way."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from swiftk.contracts.engines import TrainPlan
from swiftk.kernel.dist import DistInfo, barrier
from swiftk.kernel.errors import CheckpointError
from swiftk.kernel.parallel.none import OneProcess

TAG = "deepspeed"  # the checkpoint's subfolder (DeepSpeed's tag) that holds its partitions
UNIVERSAL = "deepspeed-universal"  # beside it: the same state made whole, written by the first resume that needs it


class DeepSpeedZero(OneProcess):
    """A frozen model beside the trained one stays a plain copy on each rank (a ZeRO engine needs an optimizer)."""

    name = "deepspeed"
    own_partitions: ClassVar[bool] = True  # ZeRO's, in ``deepspeed/``

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
    def layout(self) -> dict[str, Any]:
        return {"zero_stage": self.zero_stage}

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
        self.engine.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    @property
    def family(self) -> int:
        """The universal files' layout this stage reads: stage 3's, or stages 1-2's."""
        return 3 if self.zero_stage == 3 else 2

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
             optimizer_state: dict[str, Any], path: Path, writer: str | None = None) -> None:
        """Its own partitions as written, when this layout wrote them. Else DeepSpeed's universal loader, each rank
        reading each parameter's whole file and keeping its part: of the partitions made whole (``made_whole``)
        when another world size wrote them under this stage's layout; else of a universal folder written for this
        stage from whole tensors (``universal_for``): another stage's partitions made whole, or another engine's."""
        if writer is None:
            self.engine.load_checkpoint(str(path), tag=TAG, load_module_strict=False, load_lr_scheduler_states=False)
            return
        folder = made_whole(path, self.info.local_rank) if writer == self.name else None
        if folder is None or family_of(folder) != self.family:
            folder = self.universal_for(path, writer, weights, optimizer_state)
        # the config's ``"checkpoint": {"load_universal": true}``, which DeepSpeed reads while it loads
        self.engine._config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False, load_lr_scheduler_states=False)
        finally:
            self.engine._config.load_universal_checkpoint = False
        for values in optimizer.state.values():  # ZeRO-3's loader gives every group one step tensor, which AdamW
            if isinstance(values.get("step"), torch.Tensor):  # would count once per group: each its own copy
                values["step"] = values["step"].clone()

    def universal_for(self, path: Path, writer: str, weights: dict[str, torch.Tensor],
                      optimizer_state: dict[str, Any]) -> Path:
        """A universal folder in this stage's layout, ``deepspeed-universal-zeroN/``, from the whole tensors of the
        checkpoint's ``writer`` (``whole_state``). Its common files (DeepSpeed's counters, the optimizer's global state
        and groups) are this engine's own, from a checkpoint of its fresh state in a scratch folder (a collective),
        as DeepSpeed's converter takes them from the checkpoint it converts; the groups' hyperparameters and step
        are the saved ones."""
        from swiftk.kernel.checkpoint import optimizer_by_name
        from swiftk.kernel.parallel import engine_class

        master, whole = engine_class(writer).whole_state(path, weights, optimizer_state, self.info.local_rank)
        per_param, hyper = optimizer_by_name(whole)
        kept = sorted({key for state in per_param.values() for key in state} - {"step"})
        if self.family == 3 and kept != ["exp_avg", "exp_avg_sq"]:
            raise ValueError(f"ZeRO-3's universal loader restores Adam's two moments (exp_avg, exp_avg_sq) and this "
                             f"optimizer keeps {kept or 'no state'}: continue it under ZeRO-2, or under the layout "
                             f"that wrote it")
        folder, fresh = path / f"{UNIVERSAL}-zero{self.family}", path / f".{UNIVERSAL}-fresh"
        if self.info.rank == 0:
            shutil.rmtree(fresh, ignore_errors=True)
        barrier()
        self.engine.save_checkpoint(str(fresh), tag=TAG, save_latest=False)
        barrier()
        if self.info.local_rank == 0 and not folder.is_dir():
            publish(folder, lambda tmp: write_universal(tmp / TAG, fresh / TAG, self.family, master, per_param, hyper))
        barrier()
        if self.info.rank == 0:
            shutil.rmtree(fresh, ignore_errors=True)
        return folder

    @classmethod
    def whole_state(cls, path: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    local_rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The partitions made whole (``made_whole``), read back as the fp32 master weights and torch.optim's state
        by parameter name, each group with its saved hyperparameters (a collective)."""
        zero = made_whole(path, local_rank) / TAG / "zero"
        common = torch.load(zero / "optimizer_state.pt", weights_only=False)
        flat = common.get("optimizer_state_dict", {}).get("state", {})  # ZeRO-3 keeps one step for all
        step = next(iter(flat.values()), {}).get("step")
        master, state, groups = dict(weights), {}, []
        for group in common["param_groups"]:
            names = group["names"]
            groups.append({**group, "params": names})
            for name in names:
                saved = {file.stem: torch.load(file, weights_only=False) for file in (zero / name).glob("*.pt")}
                whole = {key: value["param"] if isinstance(value, dict) else value  # ZeRO-3's: bare, flat
                         for key, value in saved.items()}
                shape = weights[name].shape
                master[name] = whole.pop("fp32").view(shape)
                state[name] = {key: value if key == "step" else value.view(shape) for key, value in whole.items()}
                if step is not None and "step" not in state[name]:
                    state[name]["step"] = step.clone()  # one each: AdamW counts its steps in place
        return master, {"state": state, "param_groups": groups}


def family_of(folder: Path) -> int:
    """The ZeRO layout a universal folder was written in, by its model states files' names (as DeepSpeed finds
    them): ZeRO-1/2 keep one, ZeRO-3 one per rank."""
    return 2 if (folder / TAG / "mp_rank_00_model_states.pt").is_file() else 3


def made_whole(path: Path, local_rank: int) -> Path:
    """Checkpoint ``path``'s partitions as DeepSpeed's universal checkpoint, in ``deepspeed-universal/``: converted
    by each node's first process the first time a resume needs it (the other ranks wait), then reused."""
    folder = path / UNIVERSAL
    if local_rank == 0 and not folder.is_dir():
        publish(folder, lambda tmp: universal(path / TAG, tmp / TAG))
    barrier()
    return folder


def publish(folder: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary sibling of ``folder``, renamed into place: a write cut short leaves nothing
    behind, and where another node's process got there first over a shared filesystem, its folder stays."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def universal(partitions: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` on a checkpoint's ``partitions``: a folder per parameter with its fp32 weight
    and optimizer state, whole; its progress output is kept off the console unless it fails."""
    from deepspeed.checkpoint.ds_to_universal import main as to_universal

    args = argparse.Namespace(input_folder=str(partitions), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # checkpoints that predate the universal metadata
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            to_universal(args)
    except Exception as exc:  # noqa: BLE001 - the converter fails in many ways; each is this one error
        raise CheckpointError(
            f"{partitions}: DeepSpeed's converter could not make these ZeRO partitions whole ({type(exc).__name__}: "
            f"{exc}); resume with the [distributed] layout that wrote them. Its output:\n{said.getvalue()[-2000:]}"
        ) from exc
    (out.parent / "latest_universal").unlink(missing_ok=True)


SHARDED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")  # ZeRO-1/2's own


def write_universal(out: Path, fresh: Path, family: int, master: dict[str, torch.Tensor],
                    per_param: dict[str, Any], hyper: dict[str, dict[str, Any]]) -> None:
    """A universal checkpoint in ``out`` laid out as DeepSpeed's converter writes one for ``family``: the model
    states files and the optimizer's global state from ``fresh`` (this engine's own checkpoint), each group's
    hyperparameters and step from the saved ones, and a folder per parameter with its whole fp32 weight and
    optimizer state."""
    (out / "zero").mkdir(parents=True)
    for file in fresh.glob("*model_states.pt"):
        shutil.copy2(file, out / file.name)
    saved = torch.load(sorted(fresh.glob("*optim_states.pt"))[0], weights_only=False)["optimizer_state_dict"]
    base = saved["optimizer_state_dict"] if family == 3 else saved["base_optimizer_state"]
    common = saved if family == 3 else {key: value for key, value in saved.items() if key not in SHARDED}
    groups = [{**group, **{k: v for k, v in hyper[group["names"][0]].items() if k not in ("names", "params")}}
              for group in base["param_groups"]]
    common["param_groups"] = groups
    if family == 3:  # its loader takes one step, and the first group's hyperparameters, for every group
        base["param_groups"] = groups
        step = next((state["step"] for state in per_param.values() if "step" in state), None)
        if step is not None:
            base["state"] = {**base.get("state", {}), 0: {**base.get("state", {}).get(0, {}), "step": step}}
    torch.save(common, out / "zero" / "optimizer_state.pt")
    for group in groups:
        for name in group["names"]:
            (out / "zero" / name).mkdir()
            torch.save({"param": master[name].detach().float()}, out / "zero" / name / "fp32.pt")
            for key, value in per_param.get(name, {}).items():
                torch.save(value if key == "step" else {"param": value}, out / "zero" / name / f"{key}.pt")


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
