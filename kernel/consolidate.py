"""A checkpoint of any backend (one process, DDP, FSDP2, DeepSpeed ZeRO-2/3) as a plain HF folder.

    python -m swiftk.kernel.consolidate RUN/checkpoints/step-000120 OUT

Every checkpoint's ``model.safetensors`` holds the trainable weights whole: sharded runs gather them when they
save (the per-rank optimizer partitions beside it, ``deepspeed/`` and ``rng.rank-*.pt``, are only for resuming).
So the model is rebuilt from the config the checkpoint records, the weights loaded into it, and the result
written as ``final/`` would be: an HF model folder (full fine-tuning) or a PEFT adapter folder (LoRA). A
DeepSpeed checkpoint written by DeepSpeed alone (no model.safetensors) is read with its ``zero_to_fp32``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from swiftk.kernel.config import stage_class, validate
from swiftk.kernel.model import load_model, load_tokenizer
from swiftk.kernel.tuners import apply_tuner, load_trainable, save_final


def consolidate(checkpoint: Path, out: Path) -> Path:
    meta = json.loads((checkpoint / "meta.json").read_text())
    cfg = validate(meta["config"])
    tokenizer = load_tokenizer(cfg.model)
    reward_head = stage_class(cfg.train).reward_head
    pad = tokenizer.pad_token_id if reward_head else None
    model = apply_tuner(load_model(cfg.model, len(tokenizer), torch.device("cpu"), reward_head_pad_id=pad), cfg.train,
                        reward_head=reward_head)
    if (checkpoint / "model.safetensors").is_file():
        weights = load_file(str(checkpoint / "model.safetensors"))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="deepspeed")
    load_trainable(model, {k: v for k, v in weights.items() if k in dict(model.named_parameters())})
    return save_final(model, tokenizer, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N folder")
    parser.add_argument("out", type=Path, help="the HF folder to write")
    args = parser.parse_args()
    print(consolidate(args.checkpoint, args.out))
