"""[train] lean_activations: the rewritten layers give the eager gradients bit for bit, and keep less for backward."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from swiftk.contracts.events import StepEvent, of_kind, read
from swiftk.kernel.cli import main
from swiftk.kernel.compiled import CompiledBlocks
from swiftk.kernel.lean import (
    LeanGated,
    LeanLora,
    LeanNorm,
    lean_activations,
    lean_class,
    lora_compute_dtype,
    wanted,
)

from ..conftest import REPO, write_config


def tiny_llama(tuner: str, hidden_act: str = "silu", **lora: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, hidden_act=hidden_act))
    if tuner == "full":
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                             **{"lora_dropout": 0.0, **lora}), autocast_adapter_dtype=True)
    with torch.no_grad():  # B starts at zero: give every path a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def step(model: torch.nn.Module, autocast: bool, measure: bool = True) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients, and the bytes autograd kept for backward (each storage once, weights left out; 0 when not
    ``measure``d: dynamo cannot trace the hook that counts them)."""
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    kept: list[torch.Tensor] = []  # held until counted, so no storage is freed and its address reused meanwhile
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if measure else contextlib.nullcontext(), \
            torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
        sum(n for ptr, n in storages.items() if ptr not in weights)


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_lean_layers_give_the_eager_gradients_bit_for_bit_and_keep_less(tuner: str, autocast: bool) -> None:
    model = tiny_llama(tuner)
    eager_loss, eager, eager_bytes = step(model, autocast)
    counts = lean_activations(model)
    assert counts == {"lora": 21 if tuner == "lora" else 0, "norm": 7, "gated": 3, "peft": 0}
    loss, grads, kept = step(model, autocast)
    assert loss == eager_loss
    assert grads.keys() == eager.keys() and len(grads) == (42 if tuner == "lora" else 30)
    for name, grad in eager.items():
        assert torch.equal(grads[name], grad), name
    # What is kept, against eager, for this shape (3 layers of 2 x 24 tokens, hidden 64 and 128): LoRA under
    # autocast drops its per-adapter copies; in float32 peft makes none, and the MLP keeps two tensors, not four.
    expected = {("lora", True): 0.519, ("lora", False): 0.763, ("full", True): 0.705, ("full", False): 0.650}
    assert kept / eager_bytes == pytest.approx(expected[tuner, autocast], abs=0.005)


@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_another_activation_recomputes_only_the_product(tuner: str) -> None:
    model = tiny_llama(tuner, hidden_act="gelu")
    _, eager, eager_bytes = step(model, True)
    lean_activations(model)
    mlp = model.get_decoder().layers[0].mlp
    assert isinstance(mlp, LeanGated) and mlp.lean_silu is False, "down_proj keeps the product it is given"
    _, grads, kept = step(model, True)
    for name, grad in eager.items():
        assert torch.equal(grads[name], grad), name
    assert kept < eager_bytes


def test_a_layer_the_fused_path_cannot_run_runs_its_own_forward() -> None:
    x = torch.randn(2, 5, 64)
    model = tiny_llama("lora")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert lora_compute_dtype(layer, x) == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        assert lora_compute_dtype(layer, x) == torch.bfloat16
    assert lora_compute_dtype(layer, x.bfloat16()) is None, "adapters in float32, no autocast: peft's own casts"
    handle = layer.base_layer.register_forward_hook(lambda *a: None)  # e.g. ZeRO-3's gathering
    assert lora_compute_dtype(layer, x) is None
    handle.remove()
    lean_activations(model)
    mlp = model.base_model.model.model.layers[0].mlp
    gate = torch.randn(2, 5, 128)
    assert mlp.fused_down(gate) == torch.float32
    handle = mlp.down_proj.register_forward_pre_hook(lambda *a: None)
    assert mlp.fused_down(gate) is None, "GatedDown would run in the hooked layer's stead"
    handle.remove()
    with model.disable_adapter():
        assert lora_compute_dtype(layer, x) is None
    for lora in ({"lora_dropout": 0.1}, {"use_dora": True}, {"lora_bias": True}):
        other = tiny_llama("lora", **lora)
        assert lora_compute_dtype(other.base_model.model.model.layers[0].self_attn.q_proj, x) is None, lora
        assert lean_activations(other) == {"lora": 0, "norm": 7, "gated": 3, "peft": 21}, lora
        assert not isinstance(other.base_model.model.model.layers[0].self_attn.q_proj, LeanLora)


def test_evaluation_runs_the_modules_own_forward_and_a_copy_stays_lean() -> None:
    model = tiny_llama("lora")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    lean_activations(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    twin = copy.deepcopy(model)
    layers = twin.base_model.model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, LeanLora) and isinstance(layers[0].mlp, LeanGated)
    assert isinstance(layers[0].input_layernorm, LeanNorm)
    with torch.no_grad():
        twin.base_model.model.model.norm.weight.mul_(2)
        assert not torch.equal(twin(input_ids=ids).logits, before), "the copy runs its own weights"
        assert torch.equal(model(input_ids=ids).logits, before)
    assert lean_class(type(layers[1].mlp).__mro__[2], LeanGated) is type(layers[1].mlp), "one class per pair"
    assert lean_activations(model) == {"lora": 0, "norm": 0, "gated": 0, "peft": 0}, "a lean model is left as is"


def test_under_gradient_checkpointing_only_lora_layers_are_rewritten() -> None:
    assert lean_activations(tiny_llama("lora"), checkpointed=True) == {"lora": 21, "norm": 0, "gated": 0, "peft": 0}


def test_auto_rewrites_a_model_with_lora_layers_only() -> None:
    assert wanted("auto", tiny_llama("lora")) and wanted("auto", tiny_llama("lora", lora_dropout=0.05))
    assert not wanted("auto", tiny_llama("full")), "a full fine-tune pays for recomputing: its choice"
    assert wanted(True, tiny_llama("full")) and not wanted(False, tiny_llama("lora"))


def tiny(tmp_path: Path, name: str, *sets: str, tuner: str = "lora") -> list[float]:
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    path = write_config(tmp_path / f"{name}.toml", text, max_steps="6", dir=f'"{tmp_path / name}"')
    args = ["run", str(path), "--set", "eval.every=6", "--set", 'log.progress="none"',
            "--set", f"train.tuner_strategy='{tuner}'", "--set", "train.lr=1e-2"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return [s.loss for s in of_kind(read(tmp_path / name / "metrics.jsonl"), StepEvent)]


def test_a_run_trains_the_same_with_and_without_lean_activations(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    lean = tiny(tmp_path, "lean", "train.lora_dropout=0.0")
    assert "lean activations: 28 LoRA layers keep their input once; 9 norms and 4 gated activations recomputed" \
        in capsys.readouterr().out
    assert tiny(tmp_path, "eager", "train.lora_dropout=0.0", "train.lean_activations=false") == lean
    assert "lean activations" not in capsys.readouterr().out
    assert len(lean) == 6 and lean[-1] < lean[0]
    tiny(tmp_path, "dropout")  # swiftk's default lora_dropout, 0.05
    assert "9 norms and 4 gated activations recomputed in backward; 28 LoRA layers run as peft runs them (dropout" \
        in capsys.readouterr().out


def test_a_full_fine_tune_is_lean_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eager = tiny(tmp_path, "auto", tuner="full")
    assert "lean activations: off (auto: no LoRA layers; [train] lean_activations = true recomputes" \
        in capsys.readouterr().out
    assert tiny(tmp_path, "lean", "train.lean_activations=true", tuner="full") == eager
    assert "lean activations: 9 norms and 4 gated activations recomputed in backward\n" in capsys.readouterr().out


def test_lean_layers_compile_without_a_graph_break() -> None:
    torch._dynamo.reset()
    model = tiny_llama("lora")
    eager_loss, eager, _ = step(model, True, measure=False)
    lean_activations(model)
    said: list[str] = []
    compiled = CompiledBlocks.apply(model, {"backend": "aot_eager"}, said.append)
    assert compiled is not None
    loss, grads, _ = step(model, True, measure=False)
    compiled.report()
    assert compiled.calls == 3 and len(said) == 1, said
    assert loss == pytest.approx(eager_loss, rel=1e-3)
    for name, grad in eager.items():
        torch.testing.assert_close(grads[name], grad, rtol=2e-2, atol=2e-2 * float(grad.abs().max()), msg=name)
