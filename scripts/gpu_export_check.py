"""[export] on a lent GPU: GPTQ (calibrated on CUDA) and FP8-dynamic exports of a run, each checked by
`swiftk export` itself, then served by vLLM's CUDA build (`swiftk serve --engine vllm`) and asked one question.

    python scripts/gpu_export_check.py RUN_DIR OUT_DIR      # from scripts/gpu_check.sh
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import openai


def main(run: str, out: str) -> int:
    for scheme in ("gptq", "fp8-dynamic"):
        folder = Path(out) / f"export_{scheme}"
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "swiftk", "export", run, "--quantize", scheme, "--overwrite",
                        "--max-ppl-ratio", "1.5", "--out", str(folder)], check=True)
        report = json.loads((folder / "export_report.json").read_text())
        print(f"{scheme}: exported and checked in {time.monotonic() - started:.0f} s; perplexity ratios "
              f"{report['perplexity']['task']['ratio']} (task) {report['perplexity']['general']['ratio']} (prose); "
              f"{report['size_ratio']}x bf16", flush=True)
        key = "k" * 20
        server = subprocess.Popen([sys.executable, "-m", "swiftk", "serve", str(folder), "--engine", "vllm",
                                   "--port", "0"], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "SWIFTK_API_KEY": key})
        try:
            assert server.stdout is not None
            for line in server.stdout:
                if "ready at " in line:
                    url = line.split("ready at ")[1].split()[0]
                    break
            else:
                raise SystemExit(f"{scheme}: swiftk serve --engine vllm exited {server.wait()} before it was ready")
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=300)
            model = client.models.list().data[0].id
            answer = client.chat.completions.create(model=model, max_tokens=16, temperature=0, messages=[
                {"role": "user", "content": "What is the largest planet in the solar system?"}])
            text = answer.choices[0].message.content
            print(f"{scheme}: vLLM (CUDA) answered {text!r}", flush=True)
            assert text and text.strip(), f"{scheme}: an empty answer"
        finally:
            server.terminate()
            server.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
