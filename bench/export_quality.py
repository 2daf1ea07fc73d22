"""What each quantized export keeps of a run's model: `swiftk export` per scheme, each checked against the
unquantized model in the same process (its export_report.json), summed up in one JSON line.

    .venv/bin/python bench/export_quality.py [RUN_DIR] [--schemes gptq,awq,fp8,...] [--calib-samples N]

RUN_DIR defaults to runs/quickstart (`make run` writes it). The baseline is the unquantized trained model: every
figure is a ratio to it (perplexity on the run's held-out task rows and on general prose) or to its size in bf16.
Progress goes to stderr; the JSON line to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ["gptq", "awq", "fp8", "fp8-dynamic", "bnb-nf4", "bnb-int8", "q8_0", "q4_0", "merge"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", default="runs/quickstart")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated; q* are GGUF types")
    parser.add_argument("--calib-samples", type=int, default=128, help="gptq/awq calibration sequences")
    args = parser.parse_args()

    from swiftk.kernel.cli.run import quiet_libraries
    from swiftk.kernel.errors import SwiftkError
    from swiftk.kernel.export import CALIBRATED, Quant, export

    quiet_libraries()
    figures: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="swiftk-bench-export-") as folder:
        for scheme in args.schemes.split(","):
            out = Path(folder) / scheme
            quant = Quant(samples=args.calib_samples) if scheme in CALIBRATED else Quant()
            started = time.monotonic()
            print(f"export_quality: {scheme}...", file=sys.stderr, flush=True)
            gguf = scheme if scheme.startswith("q") or scheme == "f16" else None
            try:
                export(args.run_dir, out, merge=scheme == "merge", quant=quant, gguf=gguf,
                       quantize=scheme if not gguf and scheme != "merge" else None)
            except SwiftkError as exc:  # a rejected export still has its figures; anything else is said and skipped
                print(f"export_quality: {scheme}: {exc}", file=sys.stderr, flush=True)
                if not (out.with_name(scheme + ".rejected") / "export_report.json").is_file():
                    figures[scheme] = {"error": str(exc).splitlines()[0][:200]}
                    continue
                out = out.with_name(scheme + ".rejected")
            report = json.loads((out / "export_report.json").read_text())
            ppl = report["perplexity"]
            figures[scheme] = {
                "task_ppl_ratio": ppl["task"]["ratio"], "general_ppl_ratio": ppl["general"]["ratio"],
                "size_ratio": report["size_ratio"],
                "quantized_layers_ratio": (report["size_breakdown"] or {}).get("quantized_layers_ratio"),
                "answers_same": sum(a["same"] for a in report["answers"]), "answers": len(report["answers"]),
                "group_size": report.get("group_size"), "seconds": round(time.monotonic() - started, 1),
                "bound": report["max_ppl_ratio"], "passed": report["ok"],
            }
    print(json.dumps({"run": str(Path(args.run_dir).resolve()), "calib_samples": args.calib_samples,
                      "baseline": "the unquantized trained model", "exports": figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
