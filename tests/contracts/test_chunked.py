"""Cross-entropy and token log-probs from hidden states and the head, chunk by chunk, against the full logits."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

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

from ..conftest import REPO


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


def test_compiled_chunk_maths_give_the_eager_loss_and_gradients_and_fall_back_saying_why() -> None:
    """``compile_chunks`` (``[train] compile``): the compiled per-chunk maths score and differentiate like the eager
    ones over chunks of two sizes (the ragged last one); a compiler that fails says so once and the chunk runs
    eagerly, with the same numbers."""
    from swiftk.contracts.chunked import CHUNK_MATHS, compile_chunks, cross_entropy_chunk, eager_chunks

    hidden, weight = leaves()
    targets = torch.randint(0, 1000, (300,), generator=torch.Generator().manual_seed(1))
    want_loss = linear_cross_entropy(hidden, weight, targets, 0.1, chunk=64)
    want = torch.autograd.grad(want_loss, (hidden, weight))
    said: list[str] = []

    def broken(graph: object, inputs: object) -> object:
        raise RuntimeError("this backend compiles nothing")

    try:
        for options in ({"dynamic": None}, {"backend": broken}):
            compile_chunks(options, said.append)
            loss = linear_cross_entropy(hidden, weight, targets, 0.1, chunk=64)
            got = torch.autograd.grad(loss, (hidden, weight))
            torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-5)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert len(said) == 1 and "compile: the chunked loss runs eagerly from here" in said[0], said
        assert "this backend compiles nothing" in said[0] and CHUNK_MATHS["cross_entropy"] is cross_entropy_chunk
    finally:
        eager_chunks()


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


# ------------------------------------------------------------------------------ a head split by vocabulary rows

VOCAB_SPLIT = """
import sys, torch, torch.distributed as dist, torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from swiftk.contracts import ModelOutputs
from swiftk.contracts.chunked import VocabSplit, linear_cross_entropy, linear_token_logps
from swiftk.hosts.codec import stored_fields

rank, vocab = int(sys.argv[2]), int(sys.argv[3])
dist.init_process_group("gloo", init_method=sys.argv[1], rank=rank, world_size=2)
mesh = init_device_mesh("cpu", (2,))
g = torch.Generator().manual_seed(0)
hidden0 = torch.randn(70, 16, generator=g)
weight0 = 0.5 * torch.randn(vocab, 16, generator=g)
targets = torch.randint(0, vocab, (70,), generator=g)
upstream = torch.randn(70, generator=g)
worst = {}

def leaves(layout):
    hidden = hidden0.clone().requires_grad_()
    weight = distribute_tensor(weight0.clone(), mesh, [layout]).requires_grad_() if layout else \\
        weight0.clone().requires_grad_()
    return hidden, weight

def gap(name, got, want):
    got, want = got.detach(), want.detach()
    got = got.full_tensor() if isinstance(got, DTensor) else got
    scale = max(1.0, float(want.abs().max()))  # a summed loss of 70 rows: float32 rounding at its size
    worst[name] = max(worst.get(name, 0.0), float((got - want).abs().max()) / scale)

for layout in (Shard(0), Replicate()):
    tag = type(layout).__name__
    for smoothing in (0.0, 0.1):
        hidden, weight = leaves(None)
        want = F.cross_entropy(hidden @ weight.T, targets, reduction="sum", label_smoothing=smoothing)
        want_grads = torch.autograd.grad(0.37 * want, (hidden, weight))
        hidden, weight = leaves(layout)
        got = linear_cross_entropy(hidden, weight, targets, smoothing, chunk=32)  # 3 chunks, the last ragged
        got_grads = torch.autograd.grad(0.37 * got, (hidden, weight))
        gap(f"{tag} ce value", got, want)
        for name, a, b in zip(("dh", "dW"), got_grads, want_grads):
            gap(f"{tag} ce {name}", a, b)
    hidden, weight = leaves(None)
    want = (hidden @ weight.T / 0.7).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    hidden, weight = leaves(layout)
    got = linear_token_logps(hidden, weight, targets, 0.7, chunk=32)
    got_grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    gap(f"{tag} logps value", got, want)
    for name, a, b in zip(("dh", "dW"), got_grads, want_grads):
        gap(f"{tag} logps {name}", a, b)
    hidden, weight = leaves(layout)  # the logits a loss reads: gathered whole, differentiable
    outputs = ModelOutputs(hidden=hidden[None], head=weight)
    got_grads = torch.autograd.grad((outputs.logits[0] * 0.01).sum(), (hidden, weight))
    hidden, weight = leaves(None)
    gap(f"{tag} logits", outputs.logits[0], hidden @ weight.T)
    want_grads = torch.autograd.grad((hidden @ weight.T * 0.01).sum(), (hidden, weight))
    for name, a, b in zip(("dh", "dW"), got_grads, want_grads):
        gap(f"{tag} logits {name}", a, b)

_, split = leaves(Shard(0))
sent = stored_fields(ModelOutputs(hidden=hidden0[None], head=split))  # a host gets the logits, never a DTensor
assert sent["head"] is None and sent["hidden"] is None and type(sent["logits"]) is torch.Tensor
found = VocabSplit.of(split)[0]
print("RESULT", found.offset, found.local.shape[0], max(worst.values()),
      sorted(k for k, v in worst.items() if v > 1e-5))
"""


PLAIN_HEAD = """
import sys, torch
from swiftk.contracts import ModelOutputs
from swiftk.contracts.chunked import linear_cross_entropy, linear_token_logps
from swiftk.hosts.codec import stored_fields

hidden, weight = torch.randn(8, 4, requires_grad=True), torch.randn(10, 4)
linear_cross_entropy(hidden, weight, torch.arange(8)).backward()
linear_token_logps(hidden, weight, torch.arange(8)).sum().backward()
outputs = ModelOutputs(hidden=hidden[None], head=weight)
stored_fields(outputs), outputs.logits
print("LOADED", "torch.distributed.tensor" in sys.modules)
"""


def test_a_plain_head_never_imports_dtensor() -> None:
    """Scoring, reading the logits of and sending outputs with a plain head leave ``torch.distributed.tensor``
    unimported: a fresh plugin host paid 0.57 s for it at its first loss (bench/reload_latency.py's host swap stall
    went from 44 to 512 ms until the check stopped importing it)."""
    done = subprocess.run([sys.executable, "-c", PLAIN_HEAD], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "LOADED False" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("vocab", [64, 51])  # 51: 26 rows on rank 0, 25 on rank 1
def test_a_head_split_by_vocabulary_scores_like_the_whole_head(vocab: int, tmp_path: Path) -> None:
    """On 2 ranks (gloo), a head split by vocabulary rows (tensor parallelism's DTensor) gives the whole head's
    cross-entropy (with and without label smoothing), token log-probs and logits, and their gradients to the hidden
    states and to each rank's rows, without gathering the logits; a head laid out otherwise is gathered and gives
    the same; a host is sent the logits."""
    script = tmp_path / "split.py"
    script.write_text(VOCAB_SPLIT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, str(script), f"tcp://127.0.0.1:{port}", str(rank), str(vocab)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = [rank.communicate(timeout=120)[0] for rank in ranks]
    rows = -(-vocab // 2)
    for rank, out in enumerate(outputs):
        found = re.search(r"RESULT (\d+) (\d+) (\S+) (.*)", out)
        assert found, out
        assert (int(found[1]), int(found[2])) == (rank * rows, min(rows, vocab - rank * rows)), out
        assert float(found[3]) < 1e-5 and found[4] == "[]", out
