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


def fit(dtype: torch.dtype, lr: float = 1e-3, steps: int = 100, **options: object) -> tuple[float, torch.nn.Parameter,
                                                                                          torch.optim.Optimizer]:
    """Least squares towards a fixed target: the loss after ``steps`` of torch's AdamW (``options`` None) or
    native_adamw with ``options``, parameters in ``dtype``. Its updates (lr 1e-3 on values ~1) are under half a
    bfloat16 step, which is what rounding to nearest loses."""
    generator = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4096, 64, generator=generator).to(dtype))
    target = torch.randn(4096, 64, generator=generator)
    groups = [{"params": [w], "weight_decay": 0.01}]
    optimizer = torch.optim.AdamW(groups, lr=lr) if options.pop("torch", False) else native_adamw(groups, lr, **options)
    loss = torch.zeros(())
    for _ in range(steps):
        loss = ((w.float() - target) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item(), w, optimizer


def test_bfloat16_moments_with_stochastic_rounding_follow_torch_adamw_over_100_steps(adamw) -> None:
    want, reference, _ = fit(torch.float32, torch=True)
    got, w, optimizer = fit(torch.float32, bf16_moments=True, stochastic_rounding=True)
    state = optimizer.state[w]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16  # 4 bytes per parameter, not 8
    assert got == pytest.approx(want, rel=1e-5)
    assert float((w - reference).detach().abs().mean()) < 5e-4  # the parameters, not only the loss
    nearest, w_nearest, _ = fit(torch.float32, bf16_moments=True)
    assert float((w_nearest - reference).detach().abs().mean()) > 1.5 * float((w - reference).detach().abs().mean())


def test_stochastic_rounding_keeps_bfloat16_parameters_learning(adamw) -> None:
    want = fit(torch.float32, torch=True)[0]
    stalled = fit(torch.bfloat16)[0]  # rounded to nearest: most updates round back to the old value
    learning, w, _ = fit(torch.bfloat16, stochastic_rounding=True, bf16_moments=True)
    assert w.dtype == torch.bfloat16
    assert learning == pytest.approx(want, rel=2e-3) and stalled > want * 1.05, (want, stalled, learning)


def test_stochastic_rounding_is_reproducible_and_exact_on_resume(adamw) -> None:
    options = {"stochastic_rounding": True, "bf16_moments": True, "seed": 7}
    straight = params(torch.bfloat16)
    run(native_adamw([{"params": straight, "weight_decay": 0.1}], 1e-3, **options), straight, range(20))
    again = params(torch.bfloat16)
    first = native_adamw([{"params": again, "weight_decay": 0.1}], 1e-3, **options)
    run(first, again, range(8))
    state = first.state_dict()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in again]
    second = native_adamw([{"params": resumed, "weight_decay": 0.1}], 1e-3, **options)
    second.load_state_dict(state)
    assert all(second.state[p]["exp_avg_sq"].dtype == torch.bfloat16 for p in resumed)
    run(second, resumed, range(8, 20))
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed, strict=True))
    other = params(torch.bfloat16)
    run(native_adamw([{"params": other, "weight_decay": 0.1}], 1e-3, **{**options, "seed": 8}), other, range(20))
    assert not all(torch.equal(a, b) for a, b in zip(straight, other, strict=True)), "the seed picks the draws"


def test_bfloat16_moment_options_are_checked() -> None:
    with pytest.raises(ValueError, match="amsgrad keeps float32 moments"):
        native_adamw([{"params": params()}], 1e-3, amsgrad=True, bf16_moments=True)
    with pytest.raises(ValueError, match="seed must be"):
        native_adamw([{"params": params()}], 1e-3, seed=-1)
