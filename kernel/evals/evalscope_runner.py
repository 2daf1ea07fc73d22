"""Run one EvalScope task against an OpenAI-compatible endpoint: the script ``swiftk eval --backend evalscope`` runs
with the python of EvalScope's managed environment (``swiftk.kernel.envs``, tool ``evalscope``).

It imports only the standard library, EvalScope and what EvalScope installs (openai): swiftk is not installed in
that environment. Usage::

    python evalscope_runner.py JOB.json

JOB.json (written by ``swiftk.kernel.evals.evalscope``): ``{"task", "kind" ("qa" | "mcq"), "endpoint" ("chat" |
"completions"), "data_dir", "out_dir", "base_url", "model", "max_new_tokens", "timeout_s"}``. The API key comes
from ``$SWIFTK_EVALSCOPE_API_KEY``, so it is neither on a command line nor in a file. EvalScope writes
``reports/``, ``reviews/`` and ``predictions/`` under ``out_dir``; the last line printed is ``DONE out_dir``.

What reaches the endpoint (EvalScope 1.14.1, seen on the wire):

- ``chat``: EvalScope's own ``openai_api`` model. ``POST /v1/chat/completions`` with ``{"model", "messages":
  [{"role": "user", "content": PROMPT}], "max_tokens", "n": 1, "seed": 0, "temperature": 0.0}``. For ``qa`` PROMPT
  is the row's query verbatim (general_qa builds the message itself and skips its prompt template); for ``mcq``
  it is the question and options in EvalScope's English single-answer template. The server applies its chat
  template.
- ``completions``: the model API below, ``POST /v1/completions`` with ``{"model", "prompt": PROMPT, "max_tokens",
  "n": 1, "seed": 0, "temperature": 0.0}``: the same PROMPT, no chat template (as lm-eval's ``local-completions``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# This folder holds swiftk's evalscope.py, which would shadow the evalscope package for a script run from here.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

BENCHMARK = {"qa": "general_qa", "mcq": "general_mcq"}
COMPLETIONS_API = "swiftk_completions"
DONE = "DONE"


def register_completions_api() -> None:
    """Register ``swiftk_completions``: EvalScope's model API, over OpenAI's legacy completions endpoint (EvalScope's
    own ``openai_api`` speaks only chat)."""
    from evalscope.api.model import ModelAPI, ModelOutput, ModelUsage
    from evalscope.api.registry import register_model_api
    from openai import OpenAI

    class CompletionsAPI(ModelAPI):
        def __init__(self, model_name: str, base_url: str | None = None, api_key: str | None = None,
                     config: Any = None, **model_args: Any) -> None:
            super().__init__(model_name=model_name, base_url=base_url, api_key=api_key, config=config)
            self.client = OpenAI(api_key=api_key or "EMPTY", base_url=base_url, max_retries=0, **model_args)

        def generate(self, input: list, tools: list, tool_choice: Any, config: Any) -> ModelOutput:
            if len(input) != 1 or input[0].role != "user" or not isinstance(input[0].content, str):
                raise ValueError("the completions endpoint takes one text prompt: give one user message, no system "
                                 f"prompt (got roles {[m.role for m in input]})")
            reply = self.client.completions.create(
                model=self.model_name, prompt=input[0].content, max_tokens=config.max_tokens, n=1,
                temperature=config.temperature, seed=config.seed, timeout=config.timeout)
            choice = reply.choices[0]
            stop = "max_tokens" if choice.finish_reason == "length" else "stop"
            output = ModelOutput.from_content(self.model_name, choice.text, stop_reason=stop)
            if reply.usage is not None:
                output.usage = ModelUsage(input_tokens=reply.usage.prompt_tokens,
                                          output_tokens=reply.usage.completion_tokens,
                                          total_tokens=reply.usage.total_tokens)
            return output

    register_model_api(COMPLETIONS_API)(CompletionsAPI)


def task_config(job: dict, api_key: str) -> dict:
    """EvalScope's TaskConfig, as a dict: the endpoint as an OpenAI-compatible API, greedy decoding, the rows read
    from ``data_dir/<task>.jsonl`` as the benchmark's only subset, nothing fetched from a hub."""
    benchmark = BENCHMARK[job["kind"]]
    dataset: dict[str, Any] = {"local_path": job["data_dir"], "subset_list": [job["task"]], "few_shot_num": 0}
    if job["kind"] == "qa":
        # BLEU needs NLTK's punkt_tab tokenizer data, a download this offline run cannot make (it would score 0
        # with an error per item); Rouge needs nothing. Exact match is computed by the parent from the predictions.
        dataset["metric_list"] = ["Rouge"]
    else:
        from evalscope.utils.multi_choices import MultipleChoiceTemplate

        dataset["prompt_template"] = MultipleChoiceTemplate.SINGLE_ANSWER  # EvalScope's default is in Chinese
    return {
        "model": job["model"],
        "eval_type": COMPLETIONS_API if job["endpoint"] == "completions" else "openai_api",
        "api_url": job["base_url"],
        "api_key": api_key,
        "datasets": [benchmark],
        "dataset_args": {benchmark: dataset},
        "generation_config": {"max_tokens": job["max_new_tokens"], "temperature": 0.0, "n": 1, "seed": 0,
                              "timeout": job["timeout_s"], "retries": 0},
        "eval_batch_size": 8,  # concurrent requests
        "work_dir": job["out_dir"],
        "no_timestamp": True,
        "seed": 0,
    }


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[1]).read_text())
    from evalscope.config import TaskConfig
    from evalscope.run import run_task

    if job["endpoint"] == "completions":
        register_completions_api()
    config = task_config(job, os.environ.get("SWIFTK_EVALSCOPE_API_KEY") or "EMPTY")
    run_task(TaskConfig(**config))
    print(f"{DONE} {config['work_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
