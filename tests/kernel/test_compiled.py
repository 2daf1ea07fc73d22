"""[train] compile: the decoder's blocks compiled for training steps, and the ways back to eager."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swiftk.contracts.events import StepEvent, of_kind, read
from swiftk.kernel.cli import main
from swiftk.kernel.compiled import CompiledBlocks, compile_options, repeated_blocks
from swiftk.kernel.config import load_config
from swiftk.kernel.errors import ConfigError

from ..conftest import REPO, write_config

FAST = {"backend": "aot_eager"}  # dynamo and AOT autograd without inductor's C++ build: seconds, not a minute


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Dynamo keeps compiled code on the code object (LlamaDecoderLayer.forward): each test starts without it."""
    torch._dynamo.reset()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4))


def train_two_steps(model: LlamaForCausalLM) -> tuple[list[float], list[torch.Tensor]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses, [p.detach().clone() for p in model.parameters()]


def test_compiled_blocks_train_exactly_like_eager_and_evaluate_eagerly() -> None:
    eager_losses, eager_weights = train_two_steps(tiny_llama())
    model, said = tiny_llama(), []
    keys = list(model.state_dict())
    compiled = CompiledBlocks.apply(model, FAST, said.append)
    assert compiled is not None and "3 x LlamaDecoderLayer" in said[0]
    losses, weights = train_two_steps(model)
    assert compiled.calls == 2 * 3, "each block of each training step ran compiled code"
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=0)
    for got, want in zip(weights, eager_weights, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys, "checkpoints keep the model's own names"
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert compiled.calls == 6, "evaluation and generation run the blocks eagerly"
    compiled.report()
    assert len(said) == 1, "no graph break, nothing more to say"


def item_in_the_mlp(model: LlamaForCausalLM) -> int:
    """Patches every MLP with a data-dependent Python branch (what dynamo cannot trace); returns its line."""
    def forward(mlp: Any, x: torch.Tensor) -> torch.Tensor:
        out = type(mlp).forward(mlp, x)
        if out.abs().sum().item() > 0:  # the graph break
            out = out * 1.0
        return out

    for layer in model.model.layers:
        layer.mlp.forward = forward.__get__(layer.mlp)
    return forward.__code__.co_firstlineno + 2


def test_a_graph_break_is_reported_once_with_its_file_and_line() -> None:
    model, said = tiny_llama(), []
    line = item_in_the_mlp(model)
    compiled = CompiledBlocks.apply(model, FAST, said.append)
    assert compiled is not None
    train_two_steps(model)
    compiled.report()
    compiled.report()
    breaks = [s for s in said if "graph break" in s]
    assert len(breaks) == 1 and f"test_compiled.py:{line}" in breaks[0] and "item()" in breaks[0], said
    assert not compiled.eager


def test_fullgraph_that_cannot_be_captured_falls_back_to_eager_and_says_where() -> None:
    eager_losses, _ = train_two_steps(tiny_llama())
    model, said = tiny_llama(), []
    line = item_in_the_mlp(model)
    compiled = CompiledBlocks.apply(model, {**FAST, "fullgraph": True}, said.append)
    assert compiled is not None
    losses, _ = train_two_steps(model)
    assert compiled.eager and compiled.calls == 0
    failed = [s for s in said if s.startswith("compile: failed")]
    assert len(failed) == 1 and f"test_compiled.py:{line}" in failed[0] and "fullgraph" in failed[0], said
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=0)


def test_models_without_a_stack_of_blocks_or_with_partitioned_weights_run_eagerly() -> None:
    said: list[str] = []
    assert CompiledBlocks.apply(torch.nn.Sequential(torch.nn.Linear(2, 2)), {}, said.append) is None
    assert "no stack of repeated blocks" in said[0] and "eagerly" in said[0]
    model = tiny_llama()
    blocks, _ = repeated_blocks(model)
    assert blocks is model.model.layers
    next(model.model.layers[1].parameters()).ds_id = 7  # what DeepSpeed ZeRO-3 marks its parameters with
    assert repeated_blocks(model)[0] is None and "ZeRO-3" in repeated_blocks(model)[1]


def test_compile_config_is_checked_against_torch_compile(tmp_path: Path) -> None:
    assert compile_options({"mode": "max-autotune", "fullgraph": True, "dynamic": False}) == ""
    text = (REPO / "configs" / "tiny_sft.toml").read_text().replace("[train]\n", "[train]\ncompile = true\n"
                                                                    "compile_config = { fullgrph = true }\n", 1)
    with pytest.raises(ConfigError, match=r"\[train\] compile_config: fullgrph not among torch\.compile's arguments"):
        load_config(write_config(tmp_path / "c.toml", text))
    assert "backend 'tensorrt-ish'" in compile_options({"backend": "tensorrt-ish"})


def test_a_run_with_compile_trains_the_same_losses_as_eager(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    text = (REPO / "configs" / "tiny_sft.toml").read_text()
    runs = {}
    for name, sets in (("compiled", ["--set", "train.compile=true"]), ("eager", [])):
        path = write_config(tmp_path / f"{name}.toml", text, max_steps="4", batch_size="16",
                            dir=f'"{tmp_path / name}"')
        assert main(["run", str(path), "--set", "eval.every=4", "--set", 'log.progress="none"',
                     "--set", "train.precision='fp32'", *sets]) == 0  # inductor, the default backend
        runs[name] = [s.loss for s in of_kind(read(tmp_path / name / "metrics.jsonl"), StepEvent)]
        if name == "compiled":
            out = capsys.readouterr().out
            assert "compile: 4 x LlamaDecoderLayer" in out and "compile: failed" not in out, out
            assert "compile: the chunked loss's per-chunk maths too" in out, out
            assert "the chunked loss runs eagerly" not in out, out
    assert len(runs["compiled"]) == 4
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-4, atol=0)
