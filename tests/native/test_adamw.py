"""native_adamw against torch.optim.AdamW: the same float32 parameters after 100 steps, state round trips."""

from __future__ import annotations

import io

import pytest
import torch

from swiftk.native import NativeOptimizer
from swiftk.plugins.optimizers.native_adamw import native_adamw

SHAPES = [(64, 33), (7,), (300, 257), (3, 5, 7), (1,), (40000,)]  # odd sizes: vector tails and several chunks


def params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in SHAPES]


def run(optimizer: torch.optim.Optimizer, ps: list[torch.nn.Parameter], steps: range, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps.start):  # the gradients of the steps before `steps`, so a resumed run sees the same
        [torch.randn(p.shape, generator=generator) for p in ps]
    for _ in steps:
        for p in ps:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()


@pytest.mark.parametrize("weight_decay, amsgrad, maximize", [
    (0.0, False, False), (0.1, False, False), (0.1, True, False), (0.0, True, True), (0.05, False, True)])
@pytest.mark.parametrize("torch_impl", ["foreach", "fused"])
def test_matches_torch_adamw_over_100_steps(adamw, weight_decay: float, amsgrad: bool, maximize: bool,
                                             torch_impl: str) -> None:
    ours, theirs = params(), params()
    groups = [{"params": ours[:3], "names": ["a", "b", "c"], "weight_decay": weight_decay},
              {"params": ours[3:], "names": ["d", "e", "f"], "weight_decay": 0.0}]
    native = native_adamw(groups, lr=3e-3, amsgrad=amsgrad, maximize=maximize)
    reference = torch.optim.AdamW(
        [{"params": theirs[:3], "weight_decay": weight_decay}, {"params": theirs[3:], "weight_decay": 0.0}],
        lr=3e-3, amsgrad=amsgrad, maximize=maximize, **{torch_impl: True})
    run(native, ours, range(100))
    run(reference, theirs, range(100))
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            torch.testing.assert_close(native.state[a][key], reference.state[b][key], rtol=1e-5, atol=1e-9)


def test_bfloat16_parameters_keep_float32_moments(adamw) -> None:
    """bf16 parameters: moments stay float32 and the update is computed in float32, rounded once per step."""
    ours = params(torch.bfloat16)
    native = NativeOptimizer([{"params": ours, "weight_decay": 0.1}], adamw, lr=1e-2)
    master = [p.detach().float().clone() for p in ours]
    moments = [(torch.zeros_like(m), torch.zeros_like(m)) for m in master]
    generator = torch.Generator().manual_seed(1)
    for t in range(1, 21):
        for p, w, (m, v) in zip(ours, master, moments, strict=True):
            p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)
            g = p.grad.float()
            m.lerp_(g, 0.1)
            v.mul_(0.999).addcmul_(g, g, value=0.001)
            denom = v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8
            w.copy_(p.detach().float() * (1 - 1e-2 * 0.1) - (1e-2 / (1 - 0.9**t)) * m / denom)
        native.step()
        for p, w in zip(ours, master, strict=True):
            assert p.dtype == torch.bfloat16
            # the same float32 arithmetic up to operation order, so at most one bf16 ulp apart after rounding
            torch.testing.assert_close(p.detach().float(), w.to(torch.bfloat16).float(), rtol=2**-7, atol=0)
    assert all(native.state[p]["exp_avg"].dtype == torch.float32 for p in ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trips_and_a_resumed_run_matches(adamw, dtype: torch.dtype) -> None:
    straight = params(dtype)
    optimizer = NativeOptimizer([{"params": straight, "weight_decay": 0.1}], adamw, lr=1e-2, amsgrad=1)
    run(optimizer, straight, range(30))

    resumed = params(dtype)
    first = NativeOptimizer([{"params": resumed, "weight_decay": 0.1}], adamw, lr=1e-2, amsgrad=1)
    run(first, resumed, range(12))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in resumed], "optimizer": first.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    again = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    second = NativeOptimizer([{"params": again, "weight_decay": 0.1}], adamw, lr=1e-2, amsgrad=1)
    second.load_state_dict(saved["optimizer"])
    assert all(second.state[p]["exp_avg"].dtype == torch.float32 for p in again)  # not cast to the param's dtype
    assert [second.state[p]["step"] for p in again] == [12] * len(again)
    run(second, again, range(12, 30))
    for a, b in zip(straight, again, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_bad_inputs_are_refused_with_the_reason(adamw) -> None:
    p = torch.nn.Parameter(torch.randn(8, 8).t())  # not contiguous
    p.grad = torch.randn(8, 8)
    with pytest.raises(RuntimeError, match="contiguous parameters"):
        NativeOptimizer([p], adamw, lr=1e-3).step()
    q = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    q.grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32 and bfloat16 are supported"):
        NativeOptimizer([q], adamw, lr=1e-3).step()
    with pytest.raises(TypeError, match="unknown argument.*momentum"):
        NativeOptimizer([q], adamw, lr=1e-3, momentum=0.9)
