"""What a call to a host copies: a large tensor sent again and again (the LM head) is kept from its second call,
copied again only when it changed, however it changed; a fresh tensor each call is never kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from swiftk.contracts import IGNORE_INDEX, Batch, LossResult, ModelOutputs, StepState, token_cross_entropy
from swiftk.hosts.group import HostGroup, HostSpec, Policy
from swiftk.hosts.transport import KEPT_IDS, Transport
from swiftk.kernel.plugins import new_manager
from swiftk.shm import Mapping
from swiftk.shm.segments import KEEP_BYTES, KeptArena

LOSS = '''
from swiftk.contracts import LossResult, hookimpl, token_cross_entropy

@hookimpl
def swiftk_loss_compute(batch, outputs):
    return LossResult(token_cross_entropy(outputs, batch.labels) / batch.num_items_in_batch)
'''


@pytest.fixture
def host_loss(tmp_path: Path) -> Iterator[tuple[object, Transport]]:
    (tmp_path / "loss.py").write_text(LOSS)
    hosts = HostGroup([HostSpec("process:loss", [str(tmp_path / "loss.py")], ["loss"])], {"loss": Policy()})
    assert hosts.start() == []
    manager = new_manager()
    manager.register(hosts.module_proxies[0][1])
    try:
        yield manager, hosts.hosts[0].tensors
    finally:
        hosts.close()


def scored(manager: object, hidden: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, remote: bool
           ) -> tuple[float, torch.Tensor]:
    hidden = hidden.detach().requires_grad_()
    batch = Batch(labels, labels, None, num_items_in_batch=int((labels[:, 1:] != IGNORE_INDEX).sum()))
    outputs = ModelOutputs(hidden=hidden, head=head)
    if remote:
        result = manager.hook.swiftk_loss_compute(batch=batch, outputs=outputs, step=0,  # type: ignore[attr-defined]
                                                  state=StepState(0, 1, 0, 0.0, 0, 0.0, "."))
    else:
        result = LossResult(token_cross_entropy(outputs, labels) / batch.num_items_in_batch)
    result.loss.backward()
    return float(result.loss.detach()), hidden.grad


def test_a_frozen_head_crosses_once_and_again_only_when_it_changed(host_loss: tuple[object, Transport]) -> None:
    manager, transport = host_loss
    g = torch.Generator().manual_seed(0)
    head = torch.randn(4096, 64, generator=g) * 0.1  # 1 MiB: kept
    hidden = torch.randn(2, 9, 64, generator=g)
    labels = torch.randint(0, 4096, (2, 9), generator=g)

    def agrees() -> None:
        remote, local = scored(manager, hidden, head, labels, True), scored(manager, hidden, head, labels, False)
        assert remote[0] == pytest.approx(local[0], rel=1e-6)
        torch.testing.assert_close(remote[1], local[1])

    agrees()
    assert transport.kept.copies == 0, "sent once: copied for that call only, as any tensor"
    for _ in range(3):
        agrees()
    assert transport.kept.copies == 1, "sent again, unchanged: kept, copied once"
    assert [s.id for s in transport.kept.segments] == [KEPT_IDS]
    with torch.no_grad():
        head.add_(0.05)  # an optimizer step moves its version counter
    agrees()
    assert transport.kept.copies == 2
    head.data.mul_(3.0)  # a write through .data does not: the sampled elements tell
    agrees()
    assert transport.kept.copies == 3
    agrees()
    assert transport.kept.copies == 3


def test_a_trained_head_gets_its_gradient_from_the_kept_copy(host_loss: tuple[object, Transport]) -> None:
    manager, transport = host_loss
    g = torch.Generator().manual_seed(1)
    head = (torch.randn(4096, 64, generator=g) * 0.1).requires_grad_()
    hidden, labels = torch.randn(2, 7, 64, generator=g), torch.randint(0, 4096, (2, 7), generator=g)
    for _ in range(2):  # the second call reads the kept copy
        head.grad = None
        scored(manager, hidden, head, labels, True)
    remote_grad, head.grad = head.grad, None
    scored(manager, hidden, head, labels, False)
    torch.testing.assert_close(remote_grad, head.grad)
    assert transport.kept.copies == 1


def test_kept_slots_are_reused_after_their_tensor_is_gone_and_small_or_derived_tensors_are_not_kept() -> None:
    announced, mapping = [], Mapping()
    arena = KeptArena(announced.append, first_id=7)
    big = torch.arange(KEEP_BYTES // 4, dtype=torch.float32)
    assert arena.put(big) is None and not announced, "the first sending is not kept"
    for _ in range(3):
        assert arena.put(torch.ones(KEEP_BYTES // 4)) is None, "a fresh tensor each call is never kept"
    ref = arena.put(big)
    fd = announced[0].host_fd()
    mapping.attach(7, fd, announced[0].size, writable=False)
    assert torch.equal(mapping.view(ref), big)
    del big
    other = torch.ones(KEEP_BYTES // 4 - 100)
    assert arena.put(other) is None
    assert arena.put(other).segment == 7 and len(announced) == 1, "the dead tensor's segment is reused"
    assert not arena.seen, "forgotten once kept or gone"
    assert torch.equal(mapping.view(arena.put(other)), other)
    assert not KeptArena.wanted(torch.ones(10))
    assert not KeptArena.wanted(torch.ones(KEEP_BYTES, requires_grad=True) * 2), "not a leaf: new every call"
    assert not KeptArena.wanted(torch.ones(512, KEEP_BYTES // 512).t()), "not contiguous"
    arena.close()
