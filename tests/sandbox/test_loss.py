"""A loss in a sandboxed host matches the same loss in-process, gradient included. On a GPU machine the host
computes on CPU copies of the kernel's CUDA tensors (CUDA IPC handles cannot be opened from another pid
namespace), and the gradient comes back on the input's device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import swiftk.plugins  # noqa: F401  (registers the built-in losses)
from swiftk.contracts import Batch, ModelOutputs
from swiftk.hosts import tenants
from swiftk.hosts.group import HostGroup, HostSpec, Policy

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_a_sandboxed_loss_matches_in_process(tmp_path: Path, device: str) -> None:
    tmp_path.chmod(0o755)
    layers, _, _ = tenants.plan(None)
    tenant = tenants.Tenant("gpu", 61950, str(tmp_path / "scratch"))
    group = HostGroup([HostSpec("sandbox:gpu/ce", ["swiftk.plugins.losses.cross_entropy"], ["ce"], 4096, tenant,
                                tuple(layers))], {"ce": Policy("fail")})
    try:
        assert group.start() == [] and group.build("loss", "cross_entropy", {}) == []
        logits = torch.randn(2, 6, 50, device=device, requires_grad=True)
        labels = torch.randint(0, 50, (2, 6), device=device)
        batch = Batch(labels, labels, None, num_items_in_batch=10)
        result = group.proxies[("loss", "cross_entropy")].swiftk_loss_compute(
            batch=batch, outputs=ModelOutputs(logits))
        result.loss.backward()
        local = logits.detach().clone().requires_grad_()
        expected = F.cross_entropy(local[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum") / 10
        expected.backward()
        assert logits.grad is not None and logits.grad.device.type == device
        torch.testing.assert_close(result.loss.cpu(), expected.detach().cpu(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits.grad, local.grad, rtol=1e-5, atol=1e-6)
    finally:
        group.close()
