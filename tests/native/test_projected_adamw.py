"""native_projected_adamw against its Python reference (GaLore maths), and plain AdamW where nothing projects."""

from __future__ import annotations

import pytest
import torch

from swiftk.native import NativeOptimizer
from swiftk.plugins.optimizers.projected_adamw import native_projected_adamw, reference_step

SETTINGS = {"lr": 1e-2, "rank": 4, "update_proj_gap": 5, "scale": 0.25, "weight_decay": 0.1}


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 16)], ids=["left", "right", "square"])
def test_matches_the_reference_through_two_projection_refreshes(projected, shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    ours = torch.nn.Parameter(weight.clone())
    optimizer = NativeOptimizer([{"params": [ours], **SETTINGS}], projected, **SETTINGS)
    theirs, state = weight.clone(), {}
    for _ in range(12):  # refreshes at steps 1, 6 and 11
        grad = torch.randn(shape, generator=generator)
        ours.grad = grad.clone()
        optimizer.step()
        reference_step(theirs, grad, state, **SETTINGS)
        torch.testing.assert_close(ours.detach(), theirs, rtol=0, atol=1e-5)
    r = SETTINGS["rank"]
    moments = (r, max(shape)) if shape[0] <= shape[1] else (shape[0], r)
    assert optimizer.state[ours]["exp_avg"].shape == moments  # the state lives in the subspace
    assert not torch.equal(ours.detach(), weight)


def test_targets_are_projected_and_the_rest_is_plain_adamw(projected) -> None:
    generator = torch.Generator().manual_seed(1)
    attn = torch.nn.Parameter(torch.randn(32, 48, generator=generator))
    norm = torch.nn.Parameter(torch.randn(48, generator=generator))
    embed = torch.nn.Parameter(torch.randn(50, 16, generator=generator))
    twins = [torch.nn.Parameter(p.detach().clone()) for p in (norm, embed)]
    groups = [{"params": [attn, embed], "names": ["layers.0.self_attn.q_proj.weight", "embed_tokens.weight"],
               "weight_decay": 0.1},
              {"params": [norm], "names": ["layers.0.input_layernorm.weight"], "weight_decay": 0.0}]
    optimizer = native_projected_adamw(groups, lr=1e-2, rank=8, update_proj_gap=3)
    adamw = torch.optim.AdamW([{"params": [twins[0]], "weight_decay": 0.0},
                               {"params": [twins[1]], "weight_decay": 0.1}], lr=1e-2, foreach=False)
    for _ in range(5):
        for p, twin in ((norm, twins[0]), (embed, twins[1])):
            p.grad = torch.randn(p.shape, generator=generator)
            twin.grad = p.grad.clone()
        attn.grad = torch.randn(attn.shape, generator=generator)
        optimizer.step()
        adamw.step()
    assert optimizer.state[attn]["exp_avg"].shape == (8, 48)
    assert optimizer.state[attn]["proj"].shape == (32, 8)
    assert optimizer.state[embed]["proj"].numel() == 0
    for p, twin in zip((norm, embed), twins, strict=True):
        torch.testing.assert_close(p.detach(), twin.detach(), rtol=0, atol=1e-6)


def test_targets_that_match_nothing_are_a_clear_error() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"native_projected_adamw: target_modules \['q_proj'\] match none"):
        native_projected_adamw([{"params": [w], "names": ["lm_head.weight"], "weight_decay": 0.0}], lr=1e-3,
                               target_modules=("q_proj",))
