"""``swiftk export RUN_DIR --out DIR``: merge, quantize or GGUF-convert a finished run's model, then check it."""

from __future__ import annotations

import argparse
import textwrap

from swiftk.kernel.cli.run import quiet_libraries

DESCRIPTION = textwrap.dedent("""\
    Export a finished run (RUN_DIR/final) for serving, and check the export.

    An adapter run (lora, qlora, dora) is put back on the base model RUN_DIR/config.toml names, rebuilt as in
    training and checked against the base-weights fingerprint in the run's checkpoints, then merged; a QLoRA
    adapter is merged into the dequantized base (the weights it was trained against). A full, galore or
    freeze run's final/ is already a plain HF folder: --quantize or --gguf it.

      --merge               OUT: merged HF folder (safetensors + tokenizer)
      --quantize gptq       OUT: compressed-tensors folder, symmetric int4 (--bits 4) or int8 weights in groups, GPTQ
      --quantize awq        OUT: compressed-tensors folder, int4 weights in groups with zero points, AWQ scales
      --quantize fp8        OUT: compressed-tensors folder, FP8 weights per channel (W8A16)
      --quantize fp8-dynamic  the same, activations FP8 per token at run time too (W8A8; fast on Ada/Hopper)
      --quantize bnb-nf4    OUT: bitsandbytes 4-bit NF4 (double quant) / bnb-int8: 8-bit
      --gguf TYPE           OUT/<run>-<TYPE>.gguf: f16, q8_0, q5_1, q5_0, q4_1, q4_0 (Llama-family models with a
                            byte-level BPE tokenizer), for llama.cpp or transformers' gguf_file= loader
    gptq, awq and fp8 run llm-compressor in its own environment (it pins another transformers), installed on
    first use (~1.5 GB, under a minute; `swiftk env install llmcompressor` does it ahead). GPTQ and AWQ calibrate
    on --calib-samples sequences of 256 tokens: by default half the run's own training rows, half English prose
    (Python's documentation); --calib FILE takes a data file (JSONL, JSON, parquet, .txt) instead.

    Every export is written to OUT.partial, checked, then renamed to OUT. The check reloads it as its users
    would, computes its perplexity on held-out text (the run's eval_file, else the tail of its training file
    that calibration did not read; and Python's documentation) against the unquantized model's, answers the
    run's sample prompts with both, and writes OUT/export_report.json (size on disk against bf16, perplexities
    and their ratios, answers, timings). An export over its perplexity bound (--max-ppl-ratio; by default 1.01
    for 16-bit copies, 1.02 for q8_0, fp8 and gptq --bits 8, 1.05 for bnb-int8 and fp8-dynamic, 1.2 for q5,
    1.15 for gptq and awq at 4 bits, 1.35 for bnb-nf4 and q4) is kept as OUT.rejected and the command fails.

    exit codes: 0 written and checked; 1 the run cannot be exported as asked, or the export fails its check
    (the message says why); 2 bad arguments (bits a scheme does not write, a group size that does not divide
    the model's layers, a missing calibration file).""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The scheme names are checked by kernel/export.py (exit 2 naming them), so that --help imports no torch.
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", help="a run directory (holds config.toml and final/)")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the adapter into the base (adapter runs; the only export of a vision run, vlm or "
                             "clip, written with its processor)")
    parser.add_argument("--quantize", "--quant", default=None, metavar="SCHEME",
                        help="gptq, awq, fp8, fp8-dynamic, bnb-nf4 or bnb-int8: a quantized HF folder (merging an "
                             "adapter first)")
    parser.add_argument("--gguf", default=None, metavar="TYPE",
                        help="f16, q8_0, q5_1, q5_0, q4_1 or q4_0: a GGUF file (merging an adapter first)")
    parser.add_argument("--bits", type=int, default=None,
                        help="weight bits: gptq 4 (default) or 8; awq 4; fp8 8")
    parser.add_argument("--group-size", type=int, default=None,
                        help="gptq/awq: weights per scale (default: 128, else the largest of 64 and 32 that divides "
                             "every layer)")
    parser.add_argument("--calib", default="auto", metavar="FILE|auto",
                        help="gptq/awq calibration text (default auto: the run's training rows and English prose)")
    parser.add_argument("--calib-samples", type=int, default=128, metavar="N",
                        help="gptq/awq: calibration sequences of 256 tokens (default 128)")
    parser.add_argument("--max-ppl-ratio", type=float, default=None, metavar="R",
                        help="the largest perplexity ratio to the unquantized model the check accepts")
    parser.add_argument("--env-dir", default=None,
                        help="where managed environments live (default $SWIFTK_ENV_DIR or ~/.cache/swiftk/envs)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (once checked)")


def main(args: argparse.Namespace) -> int:
    quiet_libraries()
    from swiftk.kernel.export import Quant, export

    quant = Quant(bits=args.bits, group_size=args.group_size, calib=args.calib, samples=args.calib_samples)
    for line in export(args.run_dir, args.out, args.merge, args.quantize, args.gguf, args.overwrite, quant,
                       args.max_ppl_ratio, args.env_dir):
        print(line)
    return 0
