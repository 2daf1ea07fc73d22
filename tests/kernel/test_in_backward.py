"""[train] optimizer_in_backward: each parameter updated, and its gradient freed, inside backward."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swiftk.contracts.events import StepEvent, of_kind, read
from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config
from swiftk.kernel.errors import ConfigError
from swiftk.kernel.in_backward import InBackward
from swiftk.plugins.optimizers.galore import galore_adamw
from swiftk.plugins.optimizers.native_adamw import native_adamw

from ..conftest import REPO, write_config

Factory = Callable[[LlamaForCausalLM], torch.optim.Optimizer]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, tie_word_embeddings=True))


def groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for _, p in named], "names": [n for n, _ in named], "weight_decay": 0.01}]


OPTIMIZERS: dict[str, Factory] = {
    "adamw": lambda model: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
    "galore_adamw": lambda model: galore_adamw(groups(model), lr=1e-2, rank=4, update_proj_gap=2,
                                               target_modules="all-linear"),
    "native_adamw": lambda model: native_adamw(groups(model), lr=1e-2),
}


def batch() -> torch.Tensor:
    return torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


def train(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, in_backward: InBackward | None,
          steps: int = 3) -> list[float]:
    norms = []
    for _ in range(steps):
        loss = model(input_ids=batch(), labels=batch(), use_cache=False).loss
        if in_backward is not None:
            in_backward.arm()
        loss.backward()
        if in_backward is not None:
            norms.append(in_backward.finish())
        else:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
            optimizer.step()
            optimizer.zero_grad()
    return norms


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updating_inside_backward_gives_the_weights_of_a_step_after_it(name: str) -> None:
    """Each optimizer's own step, called per parameter, makes the same update as one call for all of them."""
    after, model = tiny_llama(), tiny_llama()
    norms_after = train(after, OPTIMIZERS[name](after), None)
    optimizer = OPTIMIZERS[name](model)
    in_backward = InBackward([p for p in model.parameters() if p.requires_grad], optimizer)
    norms = train(model, optimizer, in_backward)
    torch.testing.assert_close(norms, norms_after, rtol=1e-6, atol=0)
    for (key, got), want in zip(model.state_dict().items(), after.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"{name}: {key}")
    assert all(p.grad is None for p in model.parameters()), "every gradient was freed once used"
    assert in_backward.updated == len(list(model.parameters())), "the tied embedding updated once, with its sum"


def test_the_gradients_are_never_all_held() -> None:
    """Counted at each parameter's accumulation: at most one gradient alive, against all of them otherwise."""
    def peak_alive(in_backward: bool) -> int:
        model = tiny_llama()
        params = list(model.parameters())
        alive: list[int] = []
        for p in params:  # registered first: runs before InBackward's hook frees the gradient
            p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        hooks = InBackward(params, optimizer) if in_backward else None
        train(model, optimizer, hooks, steps=1)
        return max(alive)

    assert peak_alive(True) == 1
    assert peak_alive(False) == len(list(tiny_llama().parameters()))


def test_a_parameter_whose_gradient_is_not_finite_is_left_as_it_was() -> None:
    model = tiny_llama()
    params = list(model.parameters())
    in_backward = InBackward(params, torch.optim.AdamW(params, lr=1e-2))
    norm = model.model.norm.weight
    before = norm.detach().clone()
    norm.register_hook(lambda grad: grad * float("nan"))
    train(model, in_backward.optimizer, in_backward, steps=1)
    assert in_backward.not_finite == [norm] and in_backward.updated == len(params) - 1
    torch.testing.assert_close(norm.detach(), before, rtol=0, atol=0)
    in_backward.remove()
    loss = model(input_ids=batch(), labels=batch(), use_cache=False).loss
    loss.backward()  # without hooks: an ordinary backward keeps its gradients
    assert all(p.grad is not None for p in params)


def tiny_text(tmp_path: Path, name: str, **replace: str) -> Path:
    return write_config(tmp_path / f"{name}.toml", (REPO / "configs" / "tiny_sft.toml").read_text(),
                        max_steps="4", batch_size="16", dir=f'"{tmp_path / name}"', **replace)


def test_a_run_updating_inside_backward_trains_the_losses_of_one_without_clipping(tmp_path: Path) -> None:
    runs = {}
    for name, sets in (("in_backward", ["train.optimizer_in_backward=true"]), ("after", ["train.max_grad_norm=0"])):
        path = tiny_text(tmp_path, name)
        flags = [arg for value in [*sets, "eval.every=4", 'log.progress="none"', "train.precision='fp32'"]
                 for arg in ("--set", value)]
        assert main(["run", str(path), *flags]) == 0
        runs[name] = [(s.loss, s.grad_norm) for s in of_kind(read(tmp_path / name / "metrics.jsonl"), StepEvent)]
    assert len(runs["in_backward"]) == 4 and runs["in_backward"][0][1] > 0
    torch.testing.assert_close(runs["in_backward"], runs["after"], rtol=1e-5, atol=0)
    saved = load_config(tmp_path / "in_backward" / "config.toml", saved=True)
    assert saved.train.optimizer_in_backward and saved.train.max_grad_norm == 0, "the saved config says no clipping"


@pytest.mark.parametrize(("sets", "error"), [
    ({"grad_accum": "2"}, r"set grad_accum = 1 \(it is 2\)"),
    ({"max_grad_norm": "1.0"}, r"cannot clip \(max_grad_norm = 1\.0\).*set max_grad_norm = 0"),
    ({"num_processes": "2"}, r"runs in one process.*num_processes = 1"),
])
def test_what_updating_inside_backward_cannot_do_is_a_config_error(tmp_path: Path, sets: dict[str, str],
                                                                    error: str) -> None:
    text = (REPO / "configs" / "tiny_sft.toml").read_text().replace(
        "[train]\n", "[train]\noptimizer_in_backward = true\nmax_grad_norm = 0.5\n" if "max_grad_norm" in sets
        else "[train]\noptimizer_in_backward = true\n", 1)
    if "num_processes" in sets:
        text += "\n[distributed]\nnum_processes = 1\n"
    with pytest.raises(ConfigError, match=error):
        load_config(write_config(tmp_path / "c.toml", text, **sets))
