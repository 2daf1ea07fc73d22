"""``swiftk export``: a finished run's model as a merged HF folder, a quantized HF folder (bitsandbytes, or GPTQ, AWQ
and FP8 in compressed-tensors format through llm-compressor), or a GGUF file for llama.cpp-family runtimes; each
checked right after it is written (``kernel/export_check.py``, ``export_report.json``).

What is exported is ``RUN_DIR/final``: a PEFT adapter (lora, qlora, dora) is put back on the base model that
``RUN_DIR/config.toml`` names, rebuilt exactly as in training (quantized, for QLoRA) and checked against the
base-weights fingerprint the run's checkpoints recorded; a full model (full, galore, freeze) is read as is.

The export is written into ``OUT.partial`` beside ``OUT``, checked there, and only then renamed to ``OUT``: a
folder at ``OUT`` is always a checked one. One that fails its check is kept as ``OUT.rejected`` with its report,
and the command fails.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from swiftk.kernel import checkpoint, envs, export_check
from swiftk.kernel.config import RunConfig, load_config, stage_class
from swiftk.kernel.errors import SwiftkError

BNB = ("bnb-nf4", "bnb-int8")
COMPRESSED = ("gptq", "awq", "fp8", "fp8-dynamic")  # through llm-compressor, in its own environment
QUANTIZE = (*BNB, *COMPRESSED)
CALIBRATED = ("gptq", "awq")
BITS = {"gptq": (4, 8), "awq": (4,), "fp8": (8,), "fp8-dynamic": (8,)}
GROUP_SIZES = (128, 64, 32)  # tried in order when --group-size is not given: the largest that divides every layer
GGUF_TYPES = ("f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
QUANTIZE_TIMEOUT_S = 6 * 3600


class ExportError(SwiftkError):
    """The run cannot be exported as asked."""


class ExportArgumentError(ExportError):
    """The arguments ask for something no export can be."""

    exit_code = 2


@dataclass
class Trained:
    """A run's trained model as it was at the end of training."""

    model: torch.nn.Module  # a PeftModel for adapter runs
    tokenizer: Any
    cfg: RunConfig
    adapter: bool
    processor: Any = None  # a vision run's processor (saved with the export), whose tokenizer is ``tokenizer``


@dataclass
class Quant:
    """How to quantize with llm-compressor (``COMPRESSED`` schemes)."""

    bits: int | None = None  # None: the scheme's first in BITS
    group_size: int | None = None  # None: the largest of GROUP_SIZES that divides every layer
    calib: str = "auto"  # "auto" (the run's training rows and Python's documentation) or a data file
    samples: int = 128  # calibration sequences of export_check.CHUNK tokens
    dampening: float = 0.01  # GPTQ's Hessian dampening, a fraction of its mean diagonal


def check_arguments(merge: bool, quantize: str | None, gguf: str | None, quant: Quant,
                    max_ppl_ratio: float | None) -> None:
    """Refuse (exit 2) what cannot be exported whatever the run: a scheme's bits, sizes, files."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ExportArgumentError(f"--quantize {quantize}: one of {', '.join(QUANTIZE)}")
    if gguf is not None and gguf not in GGUF_TYPES:
        raise ExportArgumentError(f"--gguf {gguf}: one of {', '.join(GGUF_TYPES)} (the K-quants need llama.cpp's "
                                  f"llama-quantize on the f16 file)")
    if quantize and gguf:
        raise ExportArgumentError("give --quantize or --gguf, not both")
    if not (merge or quantize or gguf):
        raise ExportArgumentError("nothing to export: add --merge (merged HF folder), --quantize "
                                  f"{'|'.join(QUANTIZE)} or --gguf {'|'.join(GGUF_TYPES)}")
    scheme = quantize if quantize in COMPRESSED else None
    if quant.bits is not None and (scheme is None or quant.bits not in BITS[scheme]):
        allowed = "; ".join(f"{name}: {'/'.join(map(str, bits))}" for name, bits in BITS.items())
        raise ExportArgumentError(f"--bits {quant.bits} with {f'--quantize {quantize}' if quantize else 'no scheme'}: "
                                  f"the bits each scheme writes are {allowed} (bitsandbytes and GGUF name their "
                                  f"bits in their type)")
    if quant.group_size is not None and scheme not in ("gptq", "awq"):
        raise ExportArgumentError(f"--group-size is for --quantize gptq|awq (integer weights in groups); "
                                  f"{quantize or gguf or 'a merged folder'} has none")
    if quant.group_size is not None and (quant.group_size < 8 or quant.group_size & (quant.group_size - 1)):
        raise ExportArgumentError(f"--group-size {quant.group_size}: give a power of two of at least 8 "
                                  f"(128 is usual; 64 or 32 where a layer's width is not a multiple of 128)")
    if (quant.calib != "auto" or quant.samples != Quant.samples) and scheme not in CALIBRATED:
        raise ExportArgumentError(f"--calib and --calib-samples are for --quantize gptq|awq; "
                                  f"{quantize or gguf or 'a merged folder'} is written without calibration")
    if quant.calib != "auto" and not Path(quant.calib).is_file():
        raise ExportArgumentError(f"--calib {quant.calib}: no such file. Give a data file in any of swiftk's "
                                  f"formats (JSONL, JSON, parquet) or a .txt file, or 'auto' (the run's own "
                                  f"training rows and general English text)")
    if quant.samples < 1:
        raise ExportArgumentError(f"--calib-samples {quant.samples}: give at least 1")
    if max_ppl_ratio is not None and not max_ppl_ratio >= 1:  # NaN too: it would pass everything
        raise ExportArgumentError(f"--max-ppl-ratio {max_ppl_ratio}: a bound below 1 would refuse the unquantized "
                                  f"model itself; give 1 or more")


def check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that replacing could destroy: the run, a folder holding it, its final/ or checkpoints/, and a
    folder of other files (only an empty one, or an earlier export with its report, is replaced with --overwrite)."""
    target, run = out.resolve(), run_dir.resolve()
    kept = [run / "final", run / "checkpoints"]  # RUN/merged and the like may be replaced; these never
    if not out.name or target == Path.home() or target == Path.cwd() or target == run or target in run.parents \
            or any(target == k or k in target.parents for k in kept):
        raise ExportArgumentError(f"--out {out}: name a new folder outside the run (it is replaced as a whole), "
                                  f"e.g. --out {run.name}-export")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportArgumentError(f"--out {out} is a file; name a folder")
    if any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
        if not (out / export_check.REPORT).is_file():
            raise ExportError(f"--out {out} holds files that are not a swiftk export (no {export_check.REPORT}); "
                              f"--overwrite replaces only an earlier export. Choose another folder, or empty it")


def kind_of(merge: bool, quantize: str | None, gguf: str | None, bits: int | None) -> str:
    """The export's name in ``export_check.MAX_PPL_RATIO`` and its report."""
    if quantize in ("gptq", "awq"):
        return f"{quantize}-{bits}"
    return quantize or gguf or "merge"


def export(run_dir: str | Path, out: str | Path, merge: bool = False, quantize: str | None = None,
           gguf: str | None = None, overwrite: bool = False, quant: Quant | None = None,
           max_ppl_ratio: float | None = None, env_dir: str | None = None, check: bool = True) -> list[str]:
    """Write what was asked into ``out`` and check it; returns the lines that say what was written. ``check`` False
    (the merge at the end of a sharded run, as the unsharded merge): written and reloaded, not measured."""
    quant = quant or Quant()
    check_arguments(merge, quantize, gguf, quant, max_ppl_ratio)
    run_dir, out = Path(run_dir), Path(out)
    require_run(run_dir)
    check_out(run_dir, out, overwrite)
    final = run_dir / "final"
    if merge and final.is_dir() and not (final / "adapter_config.json").is_file():
        raise ExportError(
            f"--merge: {run_dir} has no adapter to merge ({final} is a full HF model folder: the run trained the "
            f"model itself, with tuner_strategy full, galore or freeze). Use it as is, or export it with --quantize "
            f"or --gguf.")
    if gguf and final.is_dir():  # before the (slow) model load
        from transformers import AutoTokenizer

        check_bpe(AutoTokenizer.from_pretrained(final))
    stage = stage_class(load_config(run_dir / "config.toml", saved=True).train)
    if (quantize or gguf) and (stage.reward_head or stage.vision):
        what = "a reward model (a scalar head)" if stage.reward_head else \
            "a vision-language model" if stage.vision == "generative" else "an image and a text encoder (CLIP-style)"
        raise ExportError(f"--{'quantize' if quantize else 'gguf'} {quantize or gguf}: {run_dir} trained {what}, "
                          f"which swiftk's {'quantized' if quantize else 'GGUF'} exports do not carry; export an "
                          f"adapter run with --merge, or use a full run's final/ folder as it is")
    if quantize in COMPRESSED:
        envs.ensure("llmcompressor", env_dir=env_dir, progress=True)  # before the model: a failed install costs less
    trained = load_trained(run_dir)
    reward = stage.reward_head
    scored = not reward and stage.vision != "dual"  # what perplexity and answers measure: a model that writes text
    if quantize in CALIBRATED:
        quant.group_size = group_size(trained.model, quant.group_size)
    timings: dict[str, float] = {}
    started = time.monotonic()
    tokenizer, cfg = trained.tokenizer, trained.cfg
    length = export_check.sequence_length(trained.model)
    held = export_check.HeldOut([], "none: not measured", [], [])
    if (check and scored) or quantize in CALIBRATED:
        held = export_check.held_out(cfg, tokenizer, length, trained.processor)
    prompts, expected = export_check.sample_prompts(cfg) if check and scored else ([], [])
    reference = export_check.Figures()
    if check and scored:
        autocast = reference_autocast(cfg, trained.model)
        reference = export_check.measure(trained.model, tokenizer, held, prompts, cfg, autocast)
    timings["reference"] = time.monotonic() - started

    lines = []
    model = trained.model
    if trained.adapter:
        from swiftk.kernel.tuners import merged

        model = merged(model, trained.cfg.train)
        lines.append(f"merged the {trained.cfg.train.tuner_strategy} adapter into the base ({model.dtype})")
    bf16 = export_check.bf16_bytes(model)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        started = time.monotonic()
        gguf_file, bits, what = write(model, trained.processor or tokenizer, staging, run_dir, quantize, gguf, quant,
                                      held, cfg, env_dir)
        timings["write"] = time.monotonic() - started
        del model, trained  # the reference's figures are kept; its weights need not share memory with the export's
        gc.collect()
        kind = kind_of(merge, quantize, gguf, bits)
        bound = max_ppl_ratio or export_check.MAX_PPL_RATIO[kind]
        started = time.monotonic()
        problem, exported = None, None
        try:
            loaded = export_check.load_export(staging, gguf_file, reward, stage.vision)
            if scored and check:
                exported = export_check.measure(loaded, tokenizer, held, prompts, cfg)
                problem = export_check.verdict(reference, exported, bound)
            del loaded
        except Exception as exc:  # noqa: BLE001 - whatever stops it loading or running is the check's finding
            problem = f"it does not load or run: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        timings["check"] = time.monotonic() - started
        result = export_check.report(kind, bound, reference, exported, held, prompts, expected,
                                     export_check.folder_bytes(staging), bf16, problem, timings,
                                     export_check.weights_breakdown(staging))
        result.update(run=str(run_dir.resolve()), out=str(out.resolve()), file=gguf_file, **what)
        (staging / export_check.REPORT).write_text(json.dumps(result, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if problem is not None:
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        os.replace(staging, rejected)
        hints = "another scheme or more bits" if quantize or gguf else "exporting again (a merge should be exact)"
        if quantize in CALIBRATED:
            hints = (f"a smaller --group-size than {what.get('group_size')}, more --calib-samples, calibration data "
                     f"closer to the model's use (--calib FILE), {hints}")
        raise export_check.CheckError(
            f"the {kind} export of {run_dir} fails its check: {problem}. It is kept in {rejected} with its report "
            f"({export_check.REPORT}); {out} was not written. Try {hints}, or accept it with --max-ppl-ratio.")
    try:
        if out.exists():
            shutil.rmtree(out)  # check_out let only an empty folder or an earlier export be replaced
        os.replace(staging, out)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out.with_name(out.name + ".rejected"), ignore_errors=True)  # an earlier try's, now superseded
    lines.append(f"{out / gguf_file if gguf_file else out} ({describe(kind, what)})")
    lines.append(summary(result))
    return lines


def reference_autocast(cfg: RunConfig, model: torch.nn.Module) -> Any:
    """The trained model computes as in training: bf16 autocast where it trained so (its adapter is fp32)."""
    from swiftk.kernel.run import make_autocast

    return make_autocast(cfg.train.precision, next(model.parameters()).device)


def write(model: torch.nn.Module, tokenizer: Any, out: Path, run_dir: Path, quantize: str | None, gguf: str | None,
          quant: Quant, held: Any, cfg: RunConfig, env_dir: str | None
          ) -> tuple[str | None, int | None, dict[str, Any]]:
    """Write the export into ``out``: (the GGUF file's name, the bits, what the report says about how)."""
    from swiftk.kernel.tuners import save_final

    if quantize in BNB:
        write_bnb(model, tokenizer, out, quantize)
        return None, 4 if quantize == "bnb-nf4" else 8, {}
    if quantize in COMPRESSED:
        return None, *write_compressed(model, tokenizer, out, quantize, quant, held, cfg, env_dir)
    if gguf:
        path = write_gguf(model, tokenizer, out / f"{run_dir.resolve().name}-{gguf}.gguf", gguf, gguf_source(cfg))
        return path.name, None, {}
    save_final(model, tokenizer, out)
    return None, None, {}


def describe(kind: str, what: dict[str, Any]) -> str:
    if kind.startswith(("gptq", "awq", "fp8")):
        return (f"{kind} in compressed-tensors format, {what.get('scheme_text', '')}; transformers and vLLM load it, "
                f"`swiftk serve` serves it")
    if kind.startswith("bnb"):
        return f"{kind} HF folder; AutoModelForCausalLM.from_pretrained loads it"
    if kind == "merge":
        return "merged HF folder, safetensors"
    return f"GGUF {kind}; llama.cpp, or transformers with gguf_file="


def summary(result: dict[str, Any]) -> str:
    ppl = result["perplexity"]
    parts = [f"{name} perplexity {v['export']:.4g} vs {v['unquantized']:.4g} ({v['ratio']:.3f}x)"
             for name, v in ppl.items() if v["ratio"] is not None]
    same = sum(1 for a in result["answers"] if a["same"])
    answers = f"; {same}/{len(result['answers'])} sample answers as before" if result["answers"] else ""
    return (f"checked: {'; '.join(parts) or 'loads'}{answers}; {result['size_bytes'] / 2**20:.1f} MiB on disk, "
            f"{result['size_ratio']:.2f}x bf16 (report: {export_check.REPORT})")


def load_trained(run_dir: Path) -> Trained:
    """``run_dir/final`` as a model: the adapter back on its rebuilt base, or the full model folder."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    final = run_dir / "final"
    require_run(run_dir)
    if not final.is_dir():
        raise ExportError(f"{final} does not exist: the run did not finish, or ran with [output] save_final = "
                          f"false. Resume it to the end (`swiftk run CONFIG --resume`) first.")
    cfg = load_config(run_dir / "config.toml", saved=True)
    if stage_class(cfg.train).vision:
        return vision_trained(run_dir, cfg)
    tokenizer = AutoTokenizer.from_pretrained(final)
    if not (final / "adapter_config.json").is_file():
        auto = AutoModelForSequenceClassification if stage_class(cfg.train).reward_head else AutoModelForCausalLM
        return Trained(auto.from_pretrained(final).eval(), tokenizer, cfg, adapter=False)
    return Trained(rebuild_adapter_model(run_dir, cfg, tokenizer).eval(), tokenizer, cfg, adapter=True)


def vision_trained(run_dir: Path, cfg: RunConfig) -> Trained:
    """A vision run's result with the processor it saved beside it: its folder as it is (a full run), or the
    adapter back on its base as training built it (loaded, or composed by ``[model.vision]``)."""
    from swiftk.kernel.config import ModelConfig
    from swiftk.kernel.model import pick_device
    from swiftk.kernel.vlm import load_processor, load_vision_model

    final = run_dir / "final"
    kind = stage_class(cfg.train).vision
    processor = load_processor(ModelConfig(model_id=str(final)))
    if not (final / "adapter_config.json").is_file():
        device = pick_device(cfg.model.device) if torch.cuda.is_available() else torch.device("cpu")
        model = load_vision_model(ModelConfig(model_id=str(final), dtype=cfg.model.dtype), processor, device, kind)
        return Trained(model.eval(), processor.tokenizer, cfg, adapter=False, processor=processor)
    model = rebuild_adapter_model(run_dir, cfg, processor.tokenizer,
                                  lambda device: load_vision_model(cfg.model, processor, device, kind))
    return Trained(model.eval(), processor.tokenizer, cfg, adapter=True, processor=processor)


def require_run(run_dir: Path) -> None:
    if not (run_dir / "config.toml").is_file():
        raise ExportError(f"{run_dir} is not a swiftk run directory (no config.toml)")


def rebuild_adapter_model(run_dir: Path, cfg: RunConfig, tokenizer: Any,
                          load_base: Callable[[torch.device], torch.nn.Module] | None = None) -> torch.nn.Module:
    """The base as training built it (same loader, seed, quantization and tuner), with the trained adapter.
    ``load_base(device)``: the loader of a base that is not a text model (a vision-language model's)."""
    from peft import set_peft_model_state_dict

    from swiftk.kernel.model import load_model, pick_device
    from swiftk.kernel.run import seed_everything
    from swiftk.kernel.tuners import apply_tuner, base_fingerprint, quantization_config

    seed_everything(cfg.train.seed)  # a random-init base is rebuilt from the run's seed
    pad_id = tokenizer.pad_token_id if stage_class(cfg.train).reward_head else None
    # The device training used where there is one: 4-bit codes are computed by the device's own kernels.
    device = pick_device(cfg.model.device) if torch.cuda.is_available() else torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = load_base(device) if load_base is not None else load_model(
            cfg.model, len(tokenizer), device, reward_head_pad_id=pad_id, quantization=quantization_config(cfg.train))
        model = apply_tuner(base, cfg.train.model_copy(update={"gradient_checkpointing": False}))
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is not None:
        recorded = json.loads((latest / "meta.json").read_text()).get("base_fingerprint")
        if recorded is not None and recorded != base_fingerprint(model):
            raise ExportError(
                f"the base model rebuilt from {run_dir / 'config.toml'} is not the one the run trained on (weights "
                f"fingerprint {base_fingerprint(model)} vs {recorded} in {latest}): [model] {cfg.model.model_id} "
                f"changed since, or its random init is not reproducible. Export from a saved base model.")
    adapter = load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise ExportError(f"{run_dir / 'final'}: adapter weights {result.unexpected_keys[:3]} do not fit the model "
                          f"the run's config builds")
    return model


# ---------------------------------------------------------------------------------------------- llm-compressor

RUNNER = Path(__file__).with_name("quantize_runner.py")
SCHEME_TEXT = {
    "gptq": "W{bits}A16: symmetric int{bits} weights in groups of {group}, rounded by GPTQ",
    "awq": "W{bits}A16: asymmetric int{bits} weights in groups of {group} (scale and zero point), scaled by AWQ",
    "fp8": "W8A16: FP8 (e4m3) weights per output channel",
    "fp8-dynamic": "W8A8: FP8 (e4m3) weights per output channel, activations FP8 per token at run time",
}


def write_compressed(model: torch.nn.Module, tokenizer: Any, out: Path, scheme: str, quant: Quant, held: Any,
                     cfg: RunConfig, env_dir: str | None) -> tuple[int, dict[str, Any]]:
    """Quantize the merged model with llm-compressor, run in its own environment on a bf16 copy; (bits, report)."""
    from swiftk.kernel.tuners import save_final

    bits = quant.bits or BITS[scheme][0]
    group = group_size(model, quant.group_size) if scheme in CALIBRATED else None
    length = export_check.sequence_length(model)
    sequences, own = export_check.calibration(held, cfg, tokenizer, quant.calib, quant.samples, length) \
        if scheme in CALIBRATED else ([], 0)
    python = envs.ensure("llmcompressor", env_dir=env_dir, progress=False)  # installed before the model loaded
    # Beside OUT (same disk, not a small /tmp); removed once quantized, kept with its log when llm-compressor fails.
    work = Path(tempfile.mkdtemp(prefix=f".{out.name.removesuffix('.partial')}.quantize-", dir=out.parent))
    try:
        save_final(model.to(torch.bfloat16), tokenizer, work / "merged")  # what the runner loads: bf16
        calibration = None
        if sequences:
            calibration = work / "calibration.jsonl"
            calibration.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in sequences))
        job = {"source": str(work / "merged"), "out": str(out), "scheme": scheme, "bits": bits, "group_size": group,
               "calibration": str(calibration) if calibration else None, "ignore": ["lm_head"],
               "dampening": quant.dampening}
        (work / "job.json").write_text(json.dumps(job, indent=1))
        started = time.monotonic()
        # -I: neither the user site nor this folder (with swiftk's modules) on the runner's sys.path
        envs.supervise([str(python), "-I", str(RUNNER), str(work / "job.json")], work / "quantize.log",
                       f"llm-compressor ({scheme}, {bits} bits)", QUANTIZE_TIMEOUT_S, {**os.environ, **envs.OFFLINE},
                       ExportError)
        seconds = time.monotonic() - started
    except ExportError:
        shutil.rmtree(work / "merged", ignore_errors=True)  # the log and the job stay for the message to name
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    what: dict[str, Any] = {
        "scheme": scheme, "bits": bits, "group_size": group,
        "scheme_text": SCHEME_TEXT[scheme].format(bits=bits, group=group),
        "tool": f"llmcompressor {envs.LLMCOMPRESSOR_VERSION}", "quantize_seconds": round(seconds, 1),
        "calibration": None if not sequences else {
            "source": ("auto: the run's training rows, then Python's documentation" if quant.calib == "auto"
                       else quant.calib),
            "sequences": len(sequences), "from_the_run": own, "tokens_each": length},
    }
    return bits, what


def linear_widths(model: torch.nn.Module) -> dict[str, int]:
    """The input width of every linear layer llm-compressor quantizes (all but the LM head)."""
    return {name: module.in_features for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")
            and not any(part.startswith("lora_") for part in name.split("."))}  # an adapter's, before the merge


def group_size(model: torch.nn.Module, asked: int | None) -> int:
    """``asked`` if it divides every layer's width (else exit 2 naming them); unasked, the largest that does."""
    widths = linear_widths(model)
    for size in [asked] if asked else GROUP_SIZES:
        if all(width % size == 0 for width in widths.values()):
            return size
    fits = [g for g in (256, 128, 64, 32, 16, 8) if all(width % g == 0 for width in widths.values())]
    if asked:
        odd = sorted({(name.split(".")[-1], width) for name, width in widths.items() if width % asked})
        raise ExportArgumentError(
            f"--group-size {asked} does not divide the input width of {', '.join(f'{n} ({w})' for n, w in odd[:4])}"
            f"; this model's layers take {', '.join(map(str, fits)) or 'no power-of-two group'}")
    raise ExportError(f"no group size of {'/'.join(map(str, GROUP_SIZES))} divides every linear layer's input width "
                      f"({sorted(set(widths.values()))}); give --group-size "
                      f"{fits[0] if fits else 'N'}" + ("" if fits else " (none of 8..256 fits: use --quantize fp8)"))


# ---------------------------------------------------------------------------------------------- bitsandbytes


def write_bnb(model: torch.nn.Module, tokenizer: Any, out: Path, kind: str) -> None:
    """Quantize on load from a plain copy, then save: transformers writes (and reloads) bnb-quantized folders."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from swiftk.kernel.tuners import save_final

    if kind == "bnb-int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory(prefix="swiftk-export-") as folder:
        save_final(model, tokenizer, Path(folder))
        device = next(model.parameters()).device
        quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config,
                                                         device_map={"": str(device)})
        save_final(quantized, tokenizer, out)


# ---------------------------------------------------------------------------------------------- GGUF

# transformers (Llama) name -> llama.cpp name, per decoder layer
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
TOP_TENSORS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str | None:
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[-1] == "weight":
        role = LAYER_TENSORS.get(".".join(parts[3:-1]))
        return f"blk.{parts[2]}.{role}.weight" if role else None
    return None


def permute_heads(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores q/k rows with the rotary halves interleaved per head (Meta's layout); transformers
    keeps them split. This is llama.cpp's ``permute``; transformers' GGUF loader undoes it."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_gguf(model: torch.nn.Module, tokenizer: Any, path: Path, kind: str, source_gguf: Path | None) -> Path:
    """A GGUF v3 file of a Llama-family model: f16 (norms f32), or q8_0, q5_1, q5_0, q4_1, q4_0 (matrices whose rows
    split into 32-value blocks in that type; the rest f16), with the tokenizer and chat template in its
    metadata. The K-quants (q4_k_m...) need llama.cpp's own quantizer: gguf-py only reads them."""
    config = model.config
    if config.model_type != "llama":
        raise ExportError(f"--gguf writes Llama-family models; this one is '{config.model_type}'. Convert the "
                          f"merged folder with llama.cpp's convert_hf_to_gguf.py instead.")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"--gguf: rope scaling '{rope.get('rope_type')}' is not written; use llama.cpp's "
                          f"convert_hf_to_gguf.py on the merged folder")
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    unknown = [k for k in state if gguf_name(k) is None]
    if unknown:
        raise ExportError(f"--gguf: tensors {unknown[:3]} have no llama.cpp name (biases or extra modules); "
                          f"convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{kind.upper()}")

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(path.stem.replace("mistral", "m-istral"))  # transformers reads a "mistral" name as Mistral
    writer.add_file_type(int(file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(state["model.embed_tokens.weight"].shape[0])
    write_tokenizer(writer, tokenizer, state["model.embed_tokens.weight"].shape[0], source_gguf)
    for name, tensor in state.items():
        if name.endswith("q_proj.weight"):
            tensor = permute_heads(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_heads(tensor, kv_heads)
        add_tensor(writer, gguf_name(name), tensor.numpy(), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tensor(writer: Any, name: str | None, data: np.ndarray, kind: str) -> None:
    if data.ndim == 1:
        writer.add_tensor(name, data.astype(np.float32))
    elif kind != "f16" and data.shape[-1] % 32 == 0:
        qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def write_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, source_gguf: Path | None) -> None:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" model: tokens by id, their types, the merges."""
    spec = check_bpe(tokenizer)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: token for i, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(source_gguf))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for token, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                       ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, token, None) is not None:
            add(getattr(tokenizer, token))
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def check_bpe(tokenizer: Any) -> dict[str, Any]:
    """The tokenizer's JSON spec; refuses what llama.cpp's "gpt2" tokenizer model cannot express."""
    spec: dict[str, Any] = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(f"--gguf writes byte-level BPE (GPT-2 style) tokenizers; this one is a "
                          f"{spec['model']['type']} tokenizer")
    return spec


def pre_tokenizer_name(source_gguf: Path | None) -> str:
    """llama.cpp picks its pre-tokenizer regex by name: keep the source GGUF's, else GPT-2's."""
    if source_gguf is not None:
        field = gguf.GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents())
    return "gpt-2"


def gguf_source(cfg: RunConfig) -> Path | None:
    if not cfg.model.gguf_file:
        return None
    from swiftk.kernel.model import resolve_source

    return Path(resolve_source(cfg.model.model_id), cfg.model.gguf_file)
