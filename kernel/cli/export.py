"""``swiftk export RUN_DIR --out DIR``: merge, quantize or GGUF-convert a finished run's model."""

from __future__ import annotations

import argparse
import textwrap

from swiftk.kernel.cli.run import quiet_libraries

DESCRIPTION = textwrap.dedent("""\
    Export a finished run (RUN_DIR/final) for serving.

    An adapter run (lora, qlora, dora) is put back on the base model RUN_DIR/config.toml names, rebuilt as in
    training and checked against the base-weights fingerprint in the run's checkpoints, then merged; a QLoRA
    adapter is merged into the dequantized base (the weights it was trained against). A full, galore or
    freeze run's final/ is already a plain HF folder: --quantize or --gguf it.

      --merge            OUT: merged HF folder (safetensors + tokenizer), for AutoModelForCausalLM.from_pretrained
      --quantize bnb-nf4 OUT: the merged model in bitsandbytes 4-bit NF4 (double quant) / bnb-int8: 8-bit;
                         transformers reloads it (bitsandbytes installed)
      --gguf f16|q8_0    OUT/<run>-<type>.gguf: Llama-family models with a byte-level BPE tokenizer, for
                         llama.cpp or transformers' gguf_file= loader
    gptq, awq and fp8 need llm-compressor in its own environment (it pins another transformers): the
    command says how.

    exit codes: 0 written, 1 the run cannot be exported as asked (the message says why).""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dir", help="a run directory (holds config.toml and final/)")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new)")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the base (adapter runs)")
    parser.add_argument("--quantize", choices=["bnb-nf4", "bnb-int8", "gptq", "awq", "fp8"], default=None,
                        help="write a quantized HF folder (merging an adapter first)")
    parser.add_argument("--gguf", choices=["f16", "q8_0"], default=None,
                        help="write a GGUF file (merging an adapter first)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def main(args: argparse.Namespace) -> int:
    quiet_libraries()
    from swiftk.kernel.export import export

    for line in export(args.run_dir, args.out, args.merge, args.quantize, args.gguf, args.overwrite):
        print(line)
    return 0
