"""LoRA and its variants: a PEFT adapter trains on a frozen base.

  lora     low-rank updates B·A beside the chosen linear layers (Hu et al. 2021); ``use_rslora`` scales them by
           alpha/sqrt(r) (Kalajdzievski 2023), ``modules_to_save`` trains whole modules (e.g. the head) too
  dora     LoRA plus a trained magnitude per output (DoRA, Liu et al. 2024)
  qlora    LoRA on a base loaded in 4 bits (NF4/FP4, bitsandbytes) or 8 bits (Dettmers et al. 2023)

The adapter weights stay float32 whatever the base's dtype, so they are their own master weights.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from typing import Any, Literal

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from pydantic import AliasChoices, Field, field_validator, model_validator

from swiftk.contracts.tuners import Tuner, TunerConfig, TunerError, register_tuner


def target_names(value: Any) -> Any:
    """LLaMA-Factory writes ``lora_target: all`` or ``q_proj,v_proj``."""
    if isinstance(value, str) and value in ("all", "all-linear", "all_linear"):
        return "all-linear"
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value


class LoRAConfig(TunerConfig):
    """[train] keys of the adapter tuners (lora, dora, qlora).

    Two of them exist only here, because they only make sense with an adapter on a frozen base: under full,
    galore or freeze, ``quantization_bit`` is an unknown key (a 4/8-bit base cannot be trained directly: use
    tuner_strategy 'qlora', or 'lora'/'dora' with quantization_bit), and so is ``modules_to_save`` (full and
    galore already train every module; freeze trains extra modules through ``freeze_extra_modules``).
    """

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
    quantization_bit: Literal[4, 8] | None = Field(
        None, description="load the frozen base in 4 or 8 bits (bitsandbytes) under lora/dora; qlora: 4 by default")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", validation_alias=AliasChoices("bnb_4bit_quant_type", "quantization_type", "quant_type"))
    bnb_4bit_use_double_quant: bool = Field(
        True, validation_alias=AliasChoices("bnb_4bit_use_double_quant", "double_quantization"),
        description="also quantize the 4-bit blocks' scales (~0.4 bits per weight saved)")
    bnb_4bit_compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype the 4-bit weights are dequantized to for each matmul")

    @field_validator("quantization_bit", mode="before")
    @classmethod
    def _quantization_bits(cls, value: Any) -> Any:
        if value in (None, 0, "none"):
            return None  # LLaMA-Factory and ms-swift configs write 0 or none for "not quantized"
        if value not in (4, 8):
            raise ValueError(f"bitsandbytes quantizes to 4 or 8 bits; {value} is not supported (GPTQ/AWQ bases "
                             f"are not loaded for training)")
        return value

    @field_validator("lora_target_modules", mode="before")
    @classmethod
    def _target_names(cls, value: Any) -> Any:
        return target_names(value)


class DoRAConfig(LoRAConfig):
    """[train] keys of dora: lora's, with ``use_dora`` always on."""

    @model_validator(mode="after")
    def _dora_sets_use_dora(self) -> DoRAConfig:
        self.use_dora = True
        return self


class QLoRAConfig(LoRAConfig):
    """[train] keys of qlora: lora's, with the base loaded in 4 bits unless ``quantization_bit = 8``."""

    @model_validator(mode="after")
    def _qlora_quantizes(self) -> QLoRAConfig:
        if self.quantization_bit is None:
            self.quantization_bit = 4
        return self


@register_tuner("lora")
class LoRA(Tuner):
    """A PEFT LoRA adapter on the frozen (possibly quantized) base."""

    config = LoRAConfig
    adapter = True
    dora = False  # DoRA whatever use_dora says

    def quantization(self, train: Any) -> Any | None:
        if train.quantization_bit is None:
            return None
        if importlib.util.find_spec("bitsandbytes") is None:
            raise TunerError(f"[train] quantization_bit = {train.quantization_bit} needs bitsandbytes: "
                             f"pip install 'bitsandbytes>=0.50' (or swiftk[optim])")
        from transformers import BitsAndBytesConfig

        if train.quantization_bit == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=train.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=train.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=getattr(torch, train.bnb_4bit_compute_dtype),
        )

    def apply(self, model: torch.nn.Module, train: Any, *, reward_head: bool) -> torch.nn.Module:
        if getattr(model, "is_quantized", False):
            # Casts the remaining (norm, embedding) weights to fp32 and readies the inputs for checkpointing.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(
            r=train.lora_rank,
            lora_alpha=train.lora_alpha,
            lora_dropout=train.lora_dropout,
            target_modules=train.lora_target_modules,
            use_rslora=train.use_rslora,
            use_dora=train.use_dora or self.dora,
            modules_to_save=list(train.modules_to_save) or None,
            task_type=task_type(model, reward_head),
        )
        try:
            # Adapter weights stay float32 whatever the base dtype (peft's autocast_adapter_dtype).
            return get_peft_model(model, lora, autocast_adapter_dtype=True)  # type: ignore[arg-type]
        except ValueError as exc:
            raise TunerError(f"[train] lora_target_modules = {train.lora_target_modules!r}: "
                             f"{str(exc).splitlines()[0]} (this model's linear layers: "
                             f"{', '.join(linear_names(model)) or 'none'})") from exc

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return merged_model(model) if isinstance(model, PeftModel) else model


@register_tuner("dora")
class DoRA(LoRA):
    """LoRA with DoRA's trained magnitude vector (Liu et al. 2024)."""

    config = DoRAConfig
    dora = True


@register_tuner("qlora")
class QLoRA(LoRA):
    """LoRA on a base quantized by bitsandbytes on load (4-bit NF4 by default)."""

    config = QLoRAConfig


def task_type(model: torch.nn.Module, reward_head: bool) -> str | None:
    """PEFT's wrapper for ``model``: SEQ_CLS for a reward model (it also trains the new score head), CAUSAL_LM for
    one that generates (language and vision-language models), and none (PEFT's plain wrapper, whose forward
    passes every input through) for one that does not: an image and a text encoder (CLIP, SigLIP)."""
    if reward_head:
        return "SEQ_CLS"
    generates = getattr(model, "can_generate", None)
    return "CAUSAL_LM" if callable(generates) and generates() else None


def linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__})


def merged_model(model: PeftModel) -> torch.nn.Module:
    """The base with the adapter folded in, as a plain (unquantized) transformers model. Consumes ``model``.

    A quantized base (QLoRA) is dequantized first, to the compute dtype, and the adapter merged into that:
    the adapter was trained against the dequantized weights, so the merged model computes what the adapter
    model computed. (Merging into the 4-bit weights would round the update away; merging into the original
    16-bit weights would add the adapter to weights it never saw.)
    """
    base = model.get_base_model()
    quantization = getattr(base.config, "quantization_config", None)
    if getattr(base, "is_quantized", False) and quantization is not None:
        lora = copy.deepcopy(model.peft_config["default"])
        compute = getattr(quantization, "bnb_4bit_compute_dtype", None)
        if isinstance(quantization, dict):
            compute = quantization.get("bnb_4bit_compute_dtype")
        dtype = getattr(torch, compute) if isinstance(compute, str) else compute or torch.float32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft looks for a config.json beside the base; dequantize says its dtype
            adapter = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
            plain = model.unload().dequantize(dtype=dtype)
        model = get_peft_model(plain, lora)
        set_peft_model_state_dict(model, adapter)
        return model.merge_and_unload().to(dtype)  # prepare_model_for_kbit_training left norms in fp32
    return model.merge_and_unload()
