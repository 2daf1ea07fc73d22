"""Cross-entropy and token log-probs from hidden states and the head, chunk by chunk, against the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swiftk.contracts import (
    IGNORE_INDEX,
    Batch,
    ModelOutputs,
    sequence_logps,
    supervised,
    token_cross_entropy,
    token_logps,
)
from swiftk.contracts.chunked import chunk_rows, linear_cross_entropy, linear_token_logps
from swiftk.hosts.codec import stored_fields, tensor_bytes


def leaves(n: int = 300, h: int = 32, v: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    return hidden, weight


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [64, 300, 1000])  # 64 leaves a ragged last chunk
def test_cross_entropy_and_its_gradients_equal_the_full_logits(smoothing: float, chunk: int) -> None:
    hidden, weight = leaves()
    targets = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1))
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="sum", label_smoothing=smoothing)
    want = torch.autograd.grad(0.37 * full, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, smoothing, chunk=chunk)
    got = torch.autograd.grad(0.37 * loss, (hidden, weight))  # the upstream scale reaches both gradients
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_and_their_gradients_equal_the_full_logits(temperature: float) -> None:
    hidden, weight = leaves()
    targets = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(2))
    upstream = torch.randn(300, generator=torch.Generator().manual_seed(3))  # what DPO or GRPO weights rows by
    z = (hidden @ weight.T) / temperature
    full = z.gather(1, targets[:, None]).squeeze(1) - z.logsumexp(-1)
    want = torch.autograd.grad((full * upstream).sum(), (hidden, weight))
    logps = linear_token_logps(hidden, weight, targets, temperature, chunk=64)
    got = torch.autograd.grad((logps * upstream).sum(), (hidden, weight))
    torch.testing.assert_close(logps, full, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_frozen_head_gets_no_gradient_and_no_grad_mode_computes_only_the_value() -> None:
    hidden, weight = leaves()
    targets = torch.zeros(300, dtype=torch.long)
    frozen = weight.detach()
    loss = linear_cross_entropy(hidden, frozen, targets)
    loss.backward()
    assert hidden.grad is not None and frozen.grad is None
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, targets)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach())


def test_bad_shapes_are_named() -> None:
    hidden, weight = leaves()
    with pytest.raises(ValueError, match=r"hidden \[N, H\] and weight \[V, H\]"):
        linear_cross_entropy(hidden, weight.T, torch.zeros(300, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets \[N\]"):
        linear_token_logps(hidden, weight, torch.zeros(299, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        linear_token_logps(hidden, weight, torch.zeros(300, dtype=torch.long), 0.0)


def test_chunks_hold_a_bounded_number_of_logits() -> None:
    assert chunk_rows(49_152) * 49_152 <= 1 << 23 and chunk_rows(49_152) >= 16
    assert chunk_rows(100) == (1 << 23) // 100
    assert chunk_rows(10_000_000) == 16


def batch_outputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [3, 7, 16] and head [50, 16] (leaves), labels [3, 7] with prompts and padding masked."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 7, 16, generator=g).requires_grad_()
    head = (0.5 * torch.randn(50, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, 50, (3, 7), generator=g)
    labels[:, :3] = IGNORE_INDEX  # the prompt
    labels[2, 5:] = IGNORE_INDEX  # padding
    return hidden, head, labels


def test_model_outputs_of_hidden_states_score_like_their_logits() -> None:
    hidden, head, labels = batch_outputs()
    chunked = ModelOutputs(hidden=hidden, head=head)
    assert "hidden" in repr(chunked) and chunked.chunked, "repr must not compute the logits"
    for fn in (lambda o: token_cross_entropy(o, labels, 0.1),
               lambda o: sequence_logps(o, labels)[0].sum(),
               lambda o: (token_logps(o, labels, 0.8)[0] * torch.arange(6.0)).sum()):
        got = torch.autograd.grad(fn(chunked), (hidden, head))
        want = torch.autograd.grad(fn(ModelOutputs(hidden @ head.T)), (hidden, head))
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    rows = Batch(labels, labels, None, num_items_in_batch=1)
    picked, targets = supervised(rows, chunked)  # [N, V] of the labelled rows only
    torch.testing.assert_close(picked, supervised(rows, ModelOutputs(hidden @ head.T))[0])
    assert picked.shape == (int((labels[:, 1:] != IGNORE_INDEX).sum()), 50) and targets.shape == picked.shape[:1]
    assert chunked.chunked, "the chunked functions never compute the logits"
    full = ModelOutputs(hidden @ head.T)
    torch.testing.assert_close(chunked.logits, full.logits)  # a loss that reads them gets them, once
    assert not chunked.chunked and chunked.logits is chunked.logits
    torch.testing.assert_close(token_logps(chunked, labels)[0], token_logps(full, labels)[0])


def test_outputs_of_hidden_states_cross_to_a_host_without_logits() -> None:
    hidden, head, _ = batch_outputs()
    outputs = ModelOutputs(hidden=hidden, head=head, extras={"ref_logps": torch.zeros(3)})
    fields = stored_fields(outputs)
    assert fields["logits"] is None and fields["hidden"] is hidden and fields["head"] is head
    assert tensor_bytes(outputs) == sum(t.numel() * 4 + 64 for t in (hidden, head, outputs.extras["ref_logps"]))
    assert outputs.chunked and outputs.device == hidden.device
    with pytest.raises(ValueError, match="neither logits nor hidden states"):
        _ = ModelOutputs().logits
