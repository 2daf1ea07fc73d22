"""[train] chunked_loss: forward passes that stop at the hidden states, and when the kernel falls back to logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swiftk.contracts import IGNORE_INDEX, Batch, token_cross_entropy
from swiftk.contracts.events import EvalEvent, StepEvent, of_kind, read
from swiftk.kernel.cli import main
from swiftk.kernel.heads import ChunkedHead, matmul_dtype

from ..conftest import REPO, write_config


def tiny_llama(**config: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, **config))


def batch() -> Batch:
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return Batch(ids, labels, torch.ones_like(ids), num_items_in_batch=int((labels[:, 1:] != IGNORE_INDEX).sum()))


class ScaledLlama(LlamaForCausalLM):
    """A model whose logits are not ``hidden @ head.T`` (as Cohere's or Gemma 2's are not)."""

    def forward(self, input_ids: Any = None, logits_to_keep: Any = 0, **kwargs: Any) -> Any:
        out = super().forward(input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 0.5
        return out


@pytest.mark.parametrize("autocast", [False, True])
def test_the_hidden_states_give_the_models_own_loss_and_gradients(autocast: bool) -> None:
    model, b = tiny_llama(), batch()
    head, why = ChunkedHead.of(model)
    assert head is not None and why == ""
    assert head.differs(model, b) == "" and model.training, "the check leaves the model in training mode"
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            outputs = head.outputs(model, b) if chunked else None
            logits = None if chunked else model(input_ids=b.input_ids, use_cache=False).logits
            compute = matmul_dtype(b.input_ids.device, torch.float32)  # bf16 where this CPU has it natively
        if chunked:
            assert outputs is not None and outputs.chunked
            assert outputs.hidden is not None
            assert outputs.hidden.dtype == compute
            loss = token_cross_entropy(outputs, b.labels)
        else:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.labels[:, 1:].flatten(),
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (chunked_loss, chunked_grads), (full_loss, full_grads) = grads
    tol = 2e-2 if autocast else 1e-5  # bf16: the full path rounds the head's gradient to bf16, ours sums in fp32
    assert chunked_loss == pytest.approx(full_loss, rel=1e-5 if not autocast else 1e-3)
    for name, g in full_grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=tol, atol=tol * float(g.abs().max()), msg=name)


def test_a_frozen_head_is_cast_once_until_it_changes_and_a_trained_one_every_time() -> None:
    model = tiny_llama()
    head, _ = ChunkedHead.of(model)
    assert head is not None
    assert head.weight(torch.float32) is model.lm_head.weight, "no cast: the parameter itself"
    model.lm_head.weight.requires_grad_(False)
    first = head.weight(torch.bfloat16)
    assert head.weight(torch.bfloat16) is first, "the same tensor, so a host finds it in shared memory"
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    again = head.weight(torch.bfloat16)
    assert again is not first and torch.equal(again, model.lm_head.weight.to(torch.bfloat16))
    model.lm_head.weight.requires_grad_(True)
    cast = head.weight(torch.bfloat16)
    assert cast.grad_fn is not None and head.weight(torch.bfloat16) is not cast, "gradients flow through each cast"


def test_models_whose_logits_are_not_hidden_times_head_are_refused() -> None:
    assert "scaled or capped (logit_scale = 0.25)" in ChunkedHead.of(tiny_llama(logit_scale=0.25))[1]
    from peft import LoraConfig, get_peft_model
    lora_head = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "lm_head"]))
    head, why = ChunkedHead.of(lora_head)
    assert head is None and "not a plain Linear" in why
    partitioned = tiny_llama()
    partitioned.lm_head.weight.ds_id = 7  # what DeepSpeed ZeRO-3 marks the parameters it partitions with
    assert "partitioned or offloaded" in ChunkedHead.of(partitioned)[1]
    torch.manual_seed(0)
    scaled = ScaledLlama(tiny_llama().config)
    head, why = ChunkedHead.of(scaled)
    assert head is not None, "nothing in its config says so: the first batch does"
    assert "differ from hidden @ head.T" in head.differs(scaled, batch())


def tiny(tmp_path: Path, name: str, *sets: str, config: str = "tiny_sft.toml") -> Path:
    text = (REPO / "configs" / config).read_text()
    path = write_config(tmp_path / f"{name}.toml", text, max_steps="8", dir=f'"{tmp_path / name}"')
    args = ["run", str(path), "--set", "eval.every=8", "--set", 'log.progress="none"']
    for item in sets:
        args += ["--set", item]
    assert main(args) == 0
    return tmp_path / name


@pytest.mark.parametrize("config, sets", [
    ("tiny_sft.toml", ()),
    ("tiny_sft.toml", ("train.tuner_strategy='lora'", "train.loss_config={label_smoothing = 0.1}")),
    ("tiny_dpo.toml", ("train.batch_size=8", "train.precompute_ref_logps=false")),
])
def test_a_run_trains_the_same_with_and_without_logits(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        config: str, sets: tuple[str, ...]) -> None:
    chunked = tiny(tmp_path, "chunked", *sets, config=config)
    assert "chunked loss off" not in capsys.readouterr().out
    full = tiny(tmp_path, "full", *sets, "train.chunked_loss=false", config=config)
    a, b = read(chunked / "metrics.jsonl"), read(full / "metrics.jsonl")
    losses = [[s.loss for s in of_kind(lines, StepEvent)] for lines in (a, b)]
    assert len(losses[0]) == 8
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=5e-3, atol=0)
    evals = [of_kind(lines, EvalEvent)[-1].metrics for lines in (a, b)]
    assert evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], rel=5e-3)


def test_a_lora_head_falls_back_to_logits_and_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny(tmp_path, "run", "train.tuner_strategy='lora'", "train.lora_target_modules=['q_proj', 'lm_head']")
    assert "chunked loss off: the output layer is" in capsys.readouterr().out
