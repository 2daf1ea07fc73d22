"""What ``[train] lean_activations`` keeps for backward and what a step costs, against the same model's eager modules.

    .venv/bin/python bench/lean_activations.py [--model smollm2|tiny] [--tuner lora|full] [--batch 8] [--seq 256]
                                               [--rounds 5] [--precision bf16|fp32]

One process builds the model once (SmolLM2-135M from the embedded GGUF, or the tiny random Llama, as
``kernel_overhead.py`` builds them; LoRA r=8 on every linear layer without dropout, or a full fine-tune), then
alternates, step by step, between its modules as transformers and peft make them (eager) and the rewritten ones
(``kernel/lean.py``), ``--rounds`` times each after one warm-up step of each. A step is the decoder's forward to
its last hidden states and backward from a scalar of them: the part the rewrites change, without the head and
the optimizer.

It prints one JSON line: ``kept_mb`` (what autograd keeps for backward, counted once per storage through
``saved_tensors_hooks``, parameters left out), ``step_s`` (median), their ratios lean / eager, and whether the
gradients are equal bit for bit (``bitwise_equal_grads``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import kernel_overhead as ko  # noqa: E402  (the same model builders)

from swiftk.kernel.lean import lean_activations  # noqa: E402


def step(decoder: torch.nn.Module, params: list[torch.Tensor], ids: torch.Tensor, autocast: bool,
         count: bool) -> tuple[float, float, list[torch.Tensor]]:
    """Seconds, MB kept for backward (0 unless ``count``), and the gradients."""
    kept: list[torch.Tensor] = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t) if count \
        else contextlib.nullcontext()
    started = time.perf_counter()
    with hooks, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state  # [B, T, H]
    (hidden.float() ** 2).mean().backward()
    seconds = time.perf_counter() - started
    weights = {p.untyped_storage().data_ptr() for p in decoder.parameters()}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return seconds, sum(n for ptr, n in storages.items() if ptr not in weights) / 2**20, grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--tuner", choices=("lora", "full"), default="lora")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = parser.parse_args()
    autocast = args.precision == "bf16"
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-") as tmp:
        if args.model == "smollm2":
            ko.export_smollm2(Path(tmp) / "smollm2")
            ko.SETUP["folder"] = Path(tmp) / "smollm2"
        # A LoRA base is stored as autocast computes (bf16) as swiftk's dtype "auto" does; a full fine-tune in fp32.
        ko.SETUP.update(tuner=args.tuner, checkpointing=False,
                        dtype=torch.bfloat16 if autocast and args.tuner == "lora" else torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(ko.SETUP["folder"] or ko.TOKENIZER)
        model: Any = ko.build_model(len(tokenizer))
        model.train()
    decoder = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    if args.tuner == "lora":
        with torch.no_grad():  # B starts at zero: let every adapter carry a gradient to its input
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
    params = [p for p in decoder.parameters() if p.requires_grad]  # the head is not run
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    own = {m: type(m) for m in model.modules()}
    counts = lean_activations(model)
    lean = {m: type(m) for m in model.modules() if type(m) is not own[m]}

    def use(kind: str) -> None:
        for module, cls in lean.items():
            module.__class__ = own[module] if kind == "eager" else cls

    figures: dict[str, dict[str, Any]] = {}
    for kind in ("eager", "lean"):  # warm-up, the kept bytes and the gradients
        use(kind)
        _, kept, grads = step(decoder, params, ids, autocast, count=True)
        figures[kind] = {"kept_mb": round(kept, 1), "grads": grads, "times": []}
    for _ in range(args.rounds):
        for kind in ("eager", "lean"):
            use(kind)
            figures[kind]["times"].append(step(decoder, params, ids, autocast, count=False)[0])
    eager, lean_ = figures["eager"], figures["lean"]
    times = {k: statistics.median(v["times"]) for k, v in figures.items()}
    print(json.dumps({
        "model": args.model, "tuner": args.tuner, "precision": args.precision, "tokens": args.batch * args.seq,
        "rewritten": counts,
        "kept_mb": {"eager": eager["kept_mb"], "lean": lean_["kept_mb"]},
        "kept_ratio": round(lean_["kept_mb"] / eager["kept_mb"], 3),
        "step_s": {k: round(v, 3) for k, v in times.items()},
        "step_ratio": round(times["lean"] / times["eager"], 3),
        "per_round_s": {k: [round(t, 3) for t in v["times"]] for k, v in figures.items()},
        "bitwise_equal_grads": all(torch.equal(a, b) for a, b in zip(eager["grads"], lean_["grads"], strict=True)),
        "rounds": args.rounds, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"),
    }), flush=True)


if __name__ == "__main__":
    main()
