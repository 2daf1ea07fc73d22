"""Quantize one merged HF folder with llm-compressor; run by ``swiftk export`` with the llmcompressor environment's
python (``swiftk env install llmcompressor``), never imported by swiftk.

Usage: ``python -I quantize_runner.py JOB.json``. The job names the source folder (the merged model in bf16), the
output folder, the scheme and its figures, and (for GPTQ and AWQ) a JSONL file of calibration sequences as token
ids, already cut by swiftk; the runner only quantizes and saves (compressed-tensors format, which transformers
and vLLM load). It imports nothing of swiftk: this environment has llm-compressor's own transformers.

Schemes (what ``swiftk export --quantize`` names):
- gptq: W4A16 or W8A16, symmetric integer weights per group, GPTQ's error-compensating rounding;
- awq: W4A16, asymmetric integer weights per group (a scale and a zero point each), scales searched by AWQ
  (activation-aware), then rounded;
- fp8: FP8 (e4m3) weights per output channel, activations left in 16 bits (W8A16);
- fp8-dynamic: FP8 weights per channel and FP8 activations quantized per token at run time (W8A8).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    started = time.monotonic()

    import torch

    if not torch.cuda.is_available():
        # llm-compressor 0.14 pins the calibration activations it caches between layers to page-locked memory,
        # which torch refuses without an accelerator ("Cannot access accelerator device"); on CPU there is
        # nothing to gain from pinning, so the cache keeps them as they are.
        from llmcompressor.pipelines import cache

        cache.IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["source"])
    model = AutoModelForCausalLM.from_pretrained(job["source"], dtype=torch.bfloat16)
    kwargs: dict[str, Any] = {}
    if job["calibration"]:
        from datasets import Dataset

        rows = [json.loads(line) for line in Path(job["calibration"]).read_text().splitlines() if line.strip()]
        ids = [row["input_ids"] for row in rows]
        data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(seq) for seq in ids]})
        kwargs = {"dataset": data, "num_calibration_samples": len(ids),
                  "max_seq_length": max(len(seq) for seq in ids)}
    oneshot(model=model, recipe=recipe(job), **kwargs)
    model.save_pretrained(job["out"], save_compressed=True)
    tokenizer.save_pretrained(job["out"])
    print(json.dumps({"seconds": round(time.monotonic() - started, 1)}))
    return 0


def recipe(job: dict[str, Any]) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme, ignore = job["scheme"], job["ignore"]
    if scheme in ("fp8", "fp8-dynamic"):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
        activations = None
        if scheme == "fp8-dynamic":
            activations = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)
        return QuantizationModifier(config_groups={"group_0": group}, ignore=ignore)
    weights = QuantizationArgs(num_bits=job["bits"], type="int", symmetric=scheme == "gptq", strategy="group",
                               group_size=job["group_size"])
    group = QuantizationScheme(targets=["Linear"], weights=weights)
    if scheme == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(config_groups={"group_0": group}, ignore=ignore, dampening_frac=job["dampening"])
    from llmcompressor.modifiers.awq import AWQModifier

    return AWQModifier(config_groups={"group_0": group}, ignore=ignore)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
