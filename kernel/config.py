"""Configuration: the schema (pydantic), loading TOML/YAML, ``--set`` overrides, and error reporting.

Every problem is collected and reported at once, with its key path, the file and line where it was found,
and a "did you mean" for misspelt keys, before anything is loaded or written.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from swiftk.hosts.settings import HostSettings
from swiftk.kernel.errors import ConfigError
from swiftk.kernel.parallel.config import DeviceConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class ModelConfig(Section):
    """[model] what to train and how to load it."""

    model_id: str = Field(description="hub id, local folder, or 'package:NAME' (a pip package's folder)")
    ref_model_id: str | None = Field(None, description="dpo: the frozen reference (default: the base model, i.e. "
                                     "the adapters disabled with LoRA, or a frozen copy with full fine-tuning)")
    gguf_file: str | None = Field(None, description="GGUF file inside model_id's folder (dequantised on load)")
    tokenizer: str | None = Field(None, description="tokenizer folder or hub id; defaults to model_id")
    init: Literal["pretrained", "random"] = Field("pretrained", description="random: build from `architecture`")
    architecture: dict[str, Any] | None = Field(
        None, description="transformers config for init='random', e.g. {model_type='llama', hidden_size=64}"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="storage dtype of the loaded weights (trainable LoRA weights stay float32)"
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    attn_implementation: str = Field("sdpa", description="'sdpa', 'eager', 'flash_attention_2'")
    device_map: str | dict[str, Any] | None = Field(
        None, description="passed to from_pretrained: 'auto' spreads a model too large for one device over the "
                          "GPUs (and CPU) accelerate sees; the model then stays where it was placed")
    trust_remote_code: bool = False


class DataConfig(Section):
    """[data] what to train on and how to turn rows into token sequences."""

    train_file: str = Field(description="JSONL, JSON, parquet, or a saved HF datasets folder")
    eval_file: str | None = None
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    max_length: int = Field(1024, ge=8)
    truncation: Literal["right", "left", "drop"] = Field(
        "right", description="over-long samples: cut the end, cut the start, or drop them"
    )
    chat_template: str | None = Field(None, description="Jinja template (or a .jinja file) replacing the tokenizer's")
    system_prompt: str | None = Field(None, description="prepended as a system turn to `messages` rows without one")
    packing: bool = Field(False, description="pack several samples per row (documents never attend to each other)")
    task_type: Literal["auto", "sft", "preference"] = Field(
        "auto", description="'preference': prompt/chosen/rejected rows (implied by a preference [train] stage)")
    shuffle: bool = True


PAIR_STAGES = ("dpo", "simpo", "orpo", "cpo", "rm")  # trained on chosen/rejected pairs, by the loss of its name
PREFERENCE_STAGES = (*PAIR_STAGES, "kto")  # kto: unpaired examples (or pairs, split into good and bad)
REFERENCE_STAGES = ("dpo", "kto")  # need the frozen reference model's log-probs
ADAPTER_TUNERS = ("lora", "qlora", "dora")  # train a PEFT adapter on a frozen (possibly quantized) base


class TrainConfig(Section):
    """[train] the optimisation: stage, tuner, loss, optimizer, schedule, batch and precision."""

    stage: Literal["sft", "dpo", "simpo", "orpo", "cpo", "rm", "kto"] = Field(
        "sft", description="sft; dpo, simpo, orpo, cpo (pairs); kto (unpaired or pairs); rm (a reward model on pairs)")
    beta: float | None = Field(None, gt=0, description="preference stages: the loss's beta (default: the stage's)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo/cpo: the assumed label-flip probability")
    precompute_ref_logps: bool = Field(False, description="dpo: score the pairs with the reference once, before "
                                       "training, instead of a reference forward every step")
    tuner_strategy: Literal["full", "lora", "qlora", "dora", "galore", "freeze"] = Field(
        "lora", validation_alias=AliasChoices("tuner_strategy", "train_type", "finetuning_type"),
        description="full; lora, qlora (LoRA on a 4/8-bit base), dora (LoRA + magnitude); galore (all weights, "
                    "low-rank optimizer state); freeze (only the last freeze_trainable_layers train)")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", validation_alias=AliasChoices("lora_target_modules", "target_modules", "lora_target"),
        description="module names (e.g. ['q_proj', 'v_proj']) or 'all-linear' (every linear layer but the head)")
    use_rslora: bool = Field(False, description="rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r")
    use_dora: bool = Field(False, description="DoRA on top of lora/qlora (tuner_strategy = 'dora' sets it)")
    modules_to_save: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("modules_to_save", "additional_target"),
        description="lora/qlora/dora: modules trained in full and saved with the adapter, e.g. ['lm_head']")
    freeze_trainable_layers: int = Field(
        2, validation_alias=AliasChoices("freeze_trainable_layers", "freeze_layers"),
        description="freeze: the last N decoder layers train (negative: the first N)")
    freeze_trainable_modules: list[str] | Literal["all"] = Field(
        "all", description="freeze: within those layers, only these modules train (e.g. ['mlp', 'self_attn'])")
    freeze_extra_modules: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("freeze_extra_modules", "trainable_parameters"),
        description="freeze: modules outside the decoder layers that train too (e.g. ['embed_tokens', 'norm'])")
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
    loss_type: str = "cross_entropy"
    loss_config: dict[str, Any] = Field(default_factory=dict)
    callbacks: list[str] = Field(default_factory=list, description="callback plugins, by name")
    callbacks_config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="{name = {arg = value}}")
    optimizer: str = "adamw"
    optimizer_config: dict[str, Any] = Field(default_factory=dict)
    lr: float = Field(1e-4, gt=0, validation_alias=AliasChoices("lr", "learning_rate"))
    weight_decay: float = Field(0.0, ge=0, description="decoupled decay of matrices (optimizer_config may set it)")
    scheduler: str = Field("cosine", validation_alias=AliasChoices("scheduler", "lr_scheduler_type"))
    scheduler_config: dict[str, Any] = Field(default_factory=dict)
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    batch_size: int = Field(
        4, ge=1, validation_alias=AliasChoices("batch_size", "per_device_train_batch_size")
    )
    grad_accum: int = Field(1, ge=1, validation_alias=AliasChoices("grad_accum", "gradient_accumulation_steps"))
    max_steps: int | None = Field(None, ge=1)
    epochs: float = Field(1.0, gt=0, validation_alias=AliasChoices("epochs", "num_train_epochs"))
    seed: int = 42
    precision: Literal["bf16", "fp32"] = Field(
        "bf16", validation_alias=AliasChoices("precision", "dtype"),
        description="autocast; master weights fp32 (fp16 needs loss scaling, which is not built yet)"
    )
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = Field(1.0, gt=0)
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="load the frozen base in 4 or 8 bits (bitsandbytes) under lora/dora; qlora: 4 by default")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", validation_alias=AliasChoices("bnb_4bit_quant_type", "quantization_type", "quant_type"))
    bnb_4bit_use_double_quant: bool = Field(
        True, validation_alias=AliasChoices("bnb_4bit_use_double_quant", "double_quantization"),
        description="also quantize the 4-bit blocks' scales (~0.4 bits per weight saved)")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul")

    @field_validator("precision", mode="before")
    @classmethod
    def _dtype_names(cls, value: Any) -> Any:
        # ms-swift style configs write torch dtype names here.
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(value, value)

    @model_validator(mode="after")
    def _precompute_needs_pairs(self) -> TrainConfig:
        if self.precompute_ref_logps and self.stage not in ("dpo",):
            raise ValueError(f"precompute_ref_logps: only for stage 'dpo' (stage '{self.stage}' "
                             + ("scores mismatched rows that depend on the batch)" if self.stage == "kto"
                                else "has no reference model)"))
        return self

    @field_validator("quantization_bit", mode="before")
    @classmethod
    def _quantization_bits(cls, value: Any) -> Any:
        if value in (None, 0, "none"):
            return None  # LLaMA-Factory and ms-swift configs write 0 or none for "not quantized"
        if value not in (4, 8):
            raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits; {value} is not supported (GPTQ/AWQ bases "
                             f"are not loaded for training)")
        return value

    @field_validator("lora_target_modules", "galore_target_modules", mode="before")
    @classmethod
    def _target_names(cls, value: Any) -> Any:
        # LLaMA-Factory writes `lora_target: all` or `q_proj,v_proj`.
        if isinstance(value, str) and value in ("all", "all-linear", "all_linear"):
            return "all-linear"
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tuner_options(self) -> TrainConfig:
        adapter = self.tuner_strategy in ADAPTER_TUNERS
        if self.tuner_strategy == "dora":
            self.use_dora = True
        if self.tuner_strategy == "qlora" and self.quantization_bit is None:
            self.quantization_bit = 4
        if self.quantization_bit is not None and not adapter:
            raise ValueError(f"quantization_bit: a {self.quantization_bit}-bit base cannot be trained directly; use "
                             f"tuner_strategy 'qlora' (or 'lora'/'dora'), not '{self.tuner_strategy}'")
        if self.modules_to_save and not adapter:
            raise ValueError(f"modules_to_save: only for lora, qlora and dora (tuner_strategy '{self.tuner_strategy}'"
                             + (" trains through freeze_extra_modules)" if self.tuner_strategy == "freeze"
                                else " already trains every module)"))
        if self.tuner_strategy == "galore":
            if self.optimizer not in ("adamw", "galore_adamw"):
                raise ValueError(f"tuner_strategy 'galore' trains with the galore_adamw optimizer; remove optimizer "
                                 f"= '{self.optimizer}' (or pick another tuner_strategy)")
            self.optimizer = "galore_adamw"
            galore = {"rank": self.galore_rank, "update_proj_gap": self.galore_update_proj_gap,
                      "scale": self.galore_scale, "proj_type": self.galore_proj_type,
                      "target_modules": self.galore_target_modules}
            self.optimizer_config = {**galore, **self.optimizer_config}
        return self


class EvalConfig(Section):
    """[eval] held-out evaluation during training (needs [data] eval_file)."""

    every: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (and at the end)")
    batch_size: int = Field(8, ge=1)
    max_batches: int | None = Field(None, ge=1)
    metrics: list[str] = Field(["perplexity", "token_accuracy"], description="metric plugins, by name")
    metric_config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="{name = {arg = value}}")
    generate: bool = Field(False, description="generate greedily for each eval prompt (text metrics)")
    exact_match: bool = Field(False, description="shortcut: generate, and add the exact_match metric")
    max_new_tokens: int = Field(16, ge=1)

    def metric_names(self) -> list[str]:
        extra = ["exact_match"] if self.exact_match and "exact_match" not in self.metrics else []
        return [*self.metrics, *extra]

    @property
    def generates(self) -> bool:
        return self.generate or "exact_match" in self.metric_names()


class SamplesConfig(Section):
    """[samples] prompts answered before and after training, so the effect of a run can be read."""

    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = Field(None, description="JSONL with a 'prompt' field per row")
    max_new_tokens: int = Field(48, ge=1)


class OutputConfig(Section):
    """[output] where the run lives and what it keeps."""

    dir: str = Field(description="the run directory itself")
    timestamp: bool = Field(False, description="create a timestamped subfolder of `dir` per run")
    save_every: int | None = Field(None, ge=1, description="checkpoint every N optimizer steps")
    keep_last: int = Field(2, ge=1, description="checkpoints kept; older ones are deleted")
    save_final: bool = Field(True, description="write a checkpoint and the final/ model when training ends")
    merge: bool = Field(False, description="LoRA: also write a merged HF model folder at the end")


class LogConfig(Section):
    """[log] what the console shows."""

    every: int = Field(1, ge=1, description="plain progress lines every N steps (no TTY)")
    progress: Literal["auto", "rich", "plain", "none"] = "auto"


class Fallback(Section):
    """``on_failure = { fallback = VALUE }``: a failed call returns VALUE (a loss: a constant, no gradient)."""

    fallback: Any = Field(description="what the failed call returns")


class PluginSource(Section):
    """[[plugins]] one plugin source, in the long form that also says where it runs."""

    path: str | None = Field(None, description="a plugin file")
    module: str | None = Field(None, description="an importable module")
    name: str | None = Field(None, description="name in logs and checkpoints (default: the file or module)")
    isolation: Literal["inline", "process", "sandbox"] = Field(
        "inline", description="'inline': in the kernel; 'process': in its own host process; 'sandbox': in a "
        "host confined as its tenant (see [tenants.NAME] and SECURITY.md)")
    tenant: str | None = Field(None, description="sandbox: the [tenants.NAME] it runs as (default: a tenant of its "
                               "own, named like the plugin, with the default limits)")
    group: str | None = Field(None, description="process, sandbox: sources with the same group share one host")
    shared: Literal["rank", "node"] = Field(
        "rank", description="process, several processes: one host per rank, or one per node that the node's ranks "
        "share (its module-level state, e.g. a reward model, loaded once; not restarted after a death)")
    deadline_s: float = Field(30.0, gt=0, description="process: seconds one hook call may take")
    on_failure: Literal["fail", "skip", "retry"] | Fallback = Field(
        "fail", description="process: what a failed call does: 'fail', 'skip', 'retry' or { fallback = value }")
    max_failures: int = Field(3, ge=1, description="process: failures within failure_window_s that quarantine it")
    failure_window_s: float = Field(300.0, gt=0, description="process: the quarantine window")
    memory_mb: int | None = Field(None, ge=256, description="process: address space its plugins may map, beyond "
                                  "what the host itself mapped at start (MiB)")
    watch: bool = Field(False, description="hot-reload this plugin when its file is saved (see --watch)")

    @model_validator(mode="after")
    def _one_source(self) -> PluginSource:
        if (self.path is None) == (self.module is None):
            raise ValueError("give exactly one of `path` or `module`")
        native = self.path and (self.path.startswith("native:") or self.path.endswith((".cpp", ".cc", ".cxx", ".so")))
        if self.isolation != "inline" and native:
            raise ValueError("a native (C++) plugin runs in the kernel process: isolation must be 'inline'")
        if self.shared == "node" and self.isolation != "process":
            raise ValueError(f"shared = 'node' is for isolation = 'process' (isolation is '{self.isolation}')")
        if self.tenant is not None and self.isolation != "sandbox":
            raise ValueError(f"`tenant` is for isolation = 'sandbox' (isolation is '{self.isolation}')")
        return self

    @property
    def source(self) -> str:
        return self.path or self.module or ""

    @property
    def label(self) -> str:
        return self.name or (Path(self.path).stem if self.path else self.module or "")


TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SandboxLayer = Literal["uid", "namespaces", "rlimits", "seccomp", "landlock", "cgroup", "no_new_privs"]


class TenantConfig(Section):
    """[tenants.NAME] one tenant: its plugins run in sandboxed hosts under its own uid, with no network, seeing
    only the interpreter, swiftk, its plugin files and its `data` (read-only) and its scratch folder."""

    plugins: list[str] = Field(default_factory=list, description="plugin files (or installed modules) that run "
                               "sandboxed as this tenant, each in its own host")
    data: list[str] = Field(default_factory=list, description="files and folders its plugins may read")
    scratch: str | None = Field(None, description="its private read-write folder, kept between runs (default: "
                                "$TMPDIR/swiftk-tenants/NAME); owned by its uid, mode 0700")
    uid: int | None = Field(None, ge=1000, lt=2**31 - 1, description="its uid and gid (default: a stable one "
                            "derived from the name, from [sandbox] uid_base)")
    memory_mb: int = Field(2048, ge=512, description="per host: address space beyond the host's own at start, and "
                           "memory cgroup limit (MiB)")
    cpu_seconds_per_call: float | None = Field(None, gt=0, description="CPU time one hook call may use; counted "
                                               "by the cgroup (without one, only deadline_s applies)")
    deadline_s: float = Field(30.0, gt=0, description="seconds one hook call may take")
    cpu_cores: float = Field(1.0, gt=0, description="per host: CPU quota in cores (cgroup)")
    pids_max: int = Field(64, ge=16, description="per host: tasks (threads) it may have (cgroup)")
    open_files: int = Field(256, ge=64, description="per host: open file descriptors")
    file_size_mb: int = Field(1024, ge=1, description="the largest file it may write")
    cpu_seconds_total: int = Field(0, ge=0, description="per host: CPU seconds over its life (SIGXCPU); 0: none")
    on_failure: Literal["fail", "skip", "retry"] | Fallback = Field(
        "skip", description="what a failed call does: 'skip' (default: a tenant cannot stop the run), 'fail', "
        "'retry' or { fallback = value }")
    max_failures: int = Field(3, ge=1, description="failures within failure_window_s that quarantine a plugin")
    failure_window_s: float = Field(300.0, gt=0, description="the quarantine window")


class SandboxConfig(Section):
    """[sandbox] how tenants' hosts are confined (see SECURITY.md and `swiftk sandbox doctor`)."""

    require: list[SandboxLayer] | None = Field(
        None, description="layers that must be available, else the run does not start (default: the core set "
        "uid, namespaces, seccomp, rlimits); every available layer is applied either way")
    uid_base: int = Field(61000, ge=1000, lt=2**31 - 8192, description="tenants' default uids are taken from "
                          "[uid_base, uid_base + 4096)")


HostsConfig = HostSettings  # [hosts]: the supervisor's own settings type (swiftk.hosts.settings), one definition


class DistributedConfig(Section):
    """[distributed] several processes, or machines: torchrun DDP, FSDP2 or DeepSpeed ZeRO (see kernel/dist.py)."""

    backend: Literal["ddp", "fsdp", "deepspeed"] = Field(
        "ddp", description="'ddp' (replicas), 'fsdp' (FSDP2, sharded per decoder layer) or 'deepspeed' (ZeRO)")
    num_processes: int = Field(1, ge=1, description="processes per node; > 1 relaunches `swiftk run` under torchrun")
    nnodes: int = Field(1, ge=1, description="machines; start `swiftk run` on each with its own node_rank")
    node_rank: int = Field(0, ge=0, description="this machine's index, 0 .. nnodes-1 (0 hosts the rendezvous)")
    master_addr: str = Field("127.0.0.1", description="address of node 0, reachable from every node")
    master_port: int = Field(0, ge=0, le=65535, description="rendezvous port on node 0; 0: a free one (one node)")
    join_timeout_s: float = Field(300.0, gt=0, description="how long every node and rank may take to join")
    timeout_s: float = Field(600.0, gt=0, description="a collective waiting longer fails (a hung rank)")
    zero_stage: Literal[2, 3] | None = Field(None, description="deepspeed: ZeRO stage (default 2)")
    deepspeed_config: str | None = Field(None, description="deepspeed: a DeepSpeed JSON; the batch and "
                                         "clipping still come from [train]")
    offload_optimizer: bool = Field(False, description="deepspeed: optimizer state in CPU memory")
    offload_param: bool = Field(False, description="deepspeed, zero_stage 3: parameters in CPU memory")
    fsdp_reshard_after_forward: bool = Field(True, description="fsdp: free gathered layers after forward")

    @model_validator(mode="after")
    def _consistent(self) -> DistributedConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and self.master_port == 0:
            raise ValueError("several nodes need a fixed master_port (the same on every node), e.g. 29500")
        ds_only = [k for k in ("zero_stage", "deepspeed_config", "offload_optimizer", "offload_param")
                   if getattr(self, k) not in (None, False)]
        if ds_only and self.backend != "deepspeed":
            raise ValueError(f"{', '.join(ds_only)}: only for backend = 'deepspeed' (backend is '{self.backend}')")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("offload_param needs zero_stage = 3")
        return self


class RunConfig(Section):
    """The whole run. One table per component."""

    plugins: list[str | PluginSource] = Field(
        default_factory=list,
        description="plugin files, importable modules, native:FILE.cpp (C++ plugins), or [[plugins]] tables",
    )
    watch: bool = Field(False, description="hot-reload every plugin file when it is saved (as --watch)")
    model: ModelConfig
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    output: OutputConfig
    log: LogConfig = Field(default_factory=LogConfig)
    hosts: HostsConfig = Field(default_factory=HostsConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict, description="[tenants.NAME] whose plugins "
                                             "run sandboxed")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)

    @model_validator(mode="after")
    def _tenants(self) -> RunConfig:
        bad = [name for name in self.tenants if not TENANT_NAME.match(name)]
        if bad:
            raise ValueError(f"tenant names {bad}: use 1-32 lowercase letters, digits, '-' or '_' (they name "
                             f"folders and cgroups)")
        for item in self.plugins:
            if isinstance(item, PluginSource) and item.tenant is not None and item.tenant not in self.tenants:
                known = ", ".join(sorted(self.tenants)) or "none"
                raise ValueError(f"[[plugins]] {item.label!r}: tenant '{item.tenant}' has no [tenants."
                                 f"{item.tenant}] table (tenants: {known})")
        uids = [t.uid for t in self.tenants.values() if t.uid is not None]
        if len(uids) != len(set(uids)):
            raise ValueError("two [tenants] tables set the same uid; each tenant needs its own")
        return self

    def total_batch(self, world_size: int = 1) -> int:
        return self.train.batch_size * self.train.grad_accum * world_size


# ------------------------------------------------------------------------------------------------ loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a config file; raise ``ConfigError`` listing every problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    text = path.read_text(encoding="utf-8")
    raw = parse_text(text, path)
    problems: list[str] = []
    from_set: set[tuple[str, ...]] = set()
    for item in overrides or []:
        try:
            key, value = parse_override(item)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        drop_other_names(raw, key)
        set_path(raw, key, value)
        from_set.add(key)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        locator = Locator(text, path)
        problems += [describe(err, locator, from_set) for err in exc.errors()]
        config = None
    if problems or config is None:
        raise ConfigError(problems, str(path))
    return config


def parse_text(text: str, path: Path) -> dict[str, Any]:
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.load(text, Loader=YamlLoader) or {}
        else:
            data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["the file must hold a table of sections ([model], [data], ...)"], str(path))
    return data


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; configs mean a float, as in YAML 1.2 and TOML."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """``train.lr=1e-4`` -> (("train", "lr"), 1e-4). The value is a TOML value; a bare word is a string."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare path or name: `--set model.model_id=./my-model`
    return tuple(part.strip() for part in key.split(".")), value


def set_path(raw: dict[str, Any], key: tuple[str, ...], value: Any) -> None:
    node = raw
    for part in key[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[key[-1]] = value


def drop_other_names(raw: dict[str, Any], key: tuple[str, ...]) -> None:
    """An override replaces its field under every name: ``--set train.lr=...`` over the file's ``learning_rate``."""
    node: Any = raw
    for part in key[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    model = section(key[:-1])
    if not isinstance(node, dict) or model is None:
        return
    for name, field in model.model_fields.items():
        names = {name, *field_aliases(field)}
        if key[-1] in names:
            for other in names - {key[-1]}:
                node.pop(other, None)


def describe(err: Any, locator: Locator, from_set: set[tuple[str, ...]]) -> str:
    """One pydantic error as ``[train] lora_rnak: unknown key; did you mean 'lora_rank'? (file:7)``."""
    loc = tuple(str(part) for part in err["loc"] if not isinstance(part, int))
    # Errors inside a union (`list[str] | Literal[...]`) carry the member type as an extra loc part.
    loc = tuple(part for part in loc if "[" not in part and "'" not in part)
    table, key = (loc[:-1], loc[-1]) if loc else ((), "")
    name = f"[{'.'.join(table)}] {key}" if table else key
    if err["type"] == "extra_forbidden":
        message = "unknown key" + did_you_mean(key, known_keys(table))
    elif err["type"] == "missing" and section(loc) is not None:
        name, message = f"[{'.'.join(loc)}]", "required table is missing"
    elif err["type"] == "missing":
        message = "required key is missing"
    else:
        message = f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
    where = "--set" if tuple(loc) in from_set else locator.find(loc)
    return f"{name}: {message}" + (f" ({where})" if where else "")


def section(table: tuple[str, ...]) -> type[BaseModel] | None:
    """The schema class of ``[table]``; None when the path is not a table."""
    model: type[BaseModel] = RunConfig
    for part in table:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def field_aliases(field: Any) -> list[str]:
    alias = field.validation_alias
    return [c for c in alias.choices if isinstance(c, str)] if isinstance(alias, AliasChoices) else []


def known_keys(table: tuple[str, ...]) -> list[str]:
    model = section(table)
    if model is None:
        return []
    return [*model.model_fields, *(a for f in model.model_fields.values() for a in field_aliases(f))]


def did_you_mean(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(set(candidates)))}"


class Locator:
    """Finds the line of a key path in the config text (TOML by scanning, YAML through its node marks)."""

    def __init__(self, text: str, path: Path) -> None:
        self.path = path
        self.lines: dict[tuple[str, ...], int] = {}
        if path.suffix in (".yaml", ".yml"):
            self._index_yaml(yaml.compose(text), ())
        else:
            self._index_toml(text)

    def find(self, loc: tuple[str, ...]) -> str | None:
        for depth in range(len(loc), 0, -1):
            line = self.lines.get(loc[:depth])
            if line is not None:
                return f"{self.path}:{line}"
        return str(self.path)

    def _index_toml(self, text: str) -> None:
        table: tuple[str, ...] = ()
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("["):
                table = tuple(p.strip().strip("\"'") for p in stripped.strip("[]").split("."))
                self.lines.setdefault(table, number)
            elif "=" in stripped and not stripped.startswith("#"):
                key = tuple(p.strip().strip("\"'") for p in stripped.split("=", 1)[0].split("."))
                self.lines.setdefault(table + key, number)

    def _index_yaml(self, node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = prefix + (str(key_node.value),)
                self.lines.setdefault(key, key_node.start_mark.line + 1)
                self._index_yaml(value_node, key)
