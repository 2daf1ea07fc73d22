"""Our tasks and models through lm-evaluation-harness (in-process): the backend behind ``swiftk eval``.

    EvalTask (contracts/evals.py)  --lm_eval_config-->  an lm-eval task config (items as a custom dataset)
    the loaded model + a Generator  -->  SwiftkLM, lm-eval's HF model class wrapping the very model object
    lm_eval.simple_evaluate(SwiftkLM, [config])  -->  TaskResult + one ItemRecord per item

``SwiftkLM`` is lm-eval's ``HFLM`` over the model we hold (a PEFT model keeps its adapter), so prompts are
rendered and tokenized as lm-eval renders them for any of its tasks; what it computes goes through our engine:
``generate_until`` through the run's ``Generator`` (hf in-process, or vLLM in its own process) and choice
log-likelihoods through the generator's ``score`` when it has one (``contracts.Scorer``). lm-eval's own
tasks (``hellaswag``...) run the same way, when their data is on this machine.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from typing import Any

from lm_eval.models.huggingface import HFLM

from swiftk.contracts import Generator, SamplingParams
from swiftk.contracts.evals import EvalTask
from swiftk.contracts.generation import Scorer
from swiftk.contracts.registry import lookup
from swiftk.kernel.evals.results import ItemRecord, TaskResult, standard_error


class SwiftkLM(HFLM):  # type: ignore[misc]
    """lm-eval's HF model class over a model object we loaded, answering through ``generator``."""

    def __init__(self, model: Any, tokenizer: Any, generator: Generator, *, batch_size: int = 16,
                 max_length: int | None = None) -> None:
        quiet = logging.getLogger("lm_eval.models.huggingface")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "pretrained is not a str": it is meant to be a model object here
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        finally:
            quiet.setLevel(level)
        self.generator = generator
        self.templated = False  # set per task: the contexts lm-eval hands over went through the chat template

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) continuations from the generator, grouped by sampling settings."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        for key, index in groups.items():
            sampling = self._sampling(json.loads(key))
            outputs = self.generator.generate([requests[i].args[0] for i in index], sampling,
                                              templated=self.templated)
            for i, completion in zip(index, outputs, strict=True):
                answers[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, completion.text)
        return [a or "" for a in answers]

    def _sampling(self, kwargs: dict[str, Any]) -> SamplingParams:
        until = kwargs.get("until") or []
        sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0)) > 0
        return SamplingParams(max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                              temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                              top_p=float(kwargs.get("top_p", 1.0)) if sample else 1.0,
                              stop=tuple([until] if isinstance(until, str) else until))

    def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if not isinstance(self.generator, Scorer):  # lm-eval's own batched forward over the model
            return list(super()._loglikelihood_tokens(requests, disable_tqdm, override_bs))
        scored = self.generator.score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        results = []
        for (key, _, _), s in zip(requests, scored, strict=True):
            results.append((s.logprob, s.greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (s.logprob, s.greedy))
        return results


# ------------------------------------------------------------------------------------------------- tasks


def lm_eval_config(task: EvalTask, items: list[dict[str, Any]], score: RewardScore | None = None) -> dict[str, Any]:
    """``task`` as an lm-eval task config whose documents are ``items`` (each gains its index ``_i``); a generate
    task's answers are scored by ``score``."""
    import datasets

    docs = [{**item, "_i": i, "target": str(item.get("target", ""))} for i, item in enumerate(items)]
    config: dict[str, Any] = {
        "task": task.name,
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
        "test_split": "test",
        "doc_to_text": "prompt",
        "metadata": {"version": 1},
    }
    if task.kind == "multiple_choice":
        return {**config, "output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold",
                "target_delimiter": "", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
    assert score is not None, "a generate task is scored by its reward"
    return {**config, "output_type": "generate_until", "doc_to_target": "target",
            "generation_kwargs": {"until": list(task.stop), "max_gen_toks": task.max_new_tokens, "do_sample": False},
            "process_results": lambda doc, results: {task.metric: score(doc["prompt"], results[0], doc["target"])},
            "metric_list": [{"metric": task.metric, "aggregation": "mean", "higher_is_better": True}]}


class RewardScore:
    """A task's reward plugin as ``(prompt, answer, reference) -> score``; a NaN score is an error. ``close()``
    ends what the plugin holds (the code reward's sandbox folder, the accuracy reward's judge process)."""

    def __init__(self, task: EvalTask) -> None:
        assert task.reward is not None
        self.task = task
        self.plugin = lookup("reward", task.reward).build(**task.reward_config)
        self.compute = self.plugin.swiftk_reward_compute
        self.wanted = set(inspect.signature(self.compute).parameters)

    def __call__(self, prompt: str, answer: str, reference: str) -> float:
        arguments = {"prompts": [prompt], "completions": [answer], "references": [reference]}
        columns = self.compute(**{k: v for k, v in arguments.items() if k in self.wanted})
        value = float(columns.get(self.task.metric, next(iter(columns.values())))[0])
        if value != value:
            raise ValueError(f"eval task '{self.task.name}': reward '{self.task.reward}' could not judge item "
                             f"{prompt[:60]!r} (NaN): its reference is missing or not in the form the reward reads")
        return value

    def close(self) -> None:
        getattr(self.plugin, "close", lambda: None)()


def run_task(lm: SwiftkLM, task: EvalTask, items: list[dict[str, Any]], *, system_prompt: str | None = None,
             limit: int | None = None) -> tuple[TaskResult, list[ItemRecord]]:
    """Evaluate one task with lm-eval on ``lm``; its figures and each item's record."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    items = items[:limit] if limit else items
    score = RewardScore(task) if task.kind == "generate" else None
    lm.templated = task.chat
    started = time.perf_counter()
    try:
        out = simple_evaluate(model=lm, tasks=[lm_eval_config(task, items, score)],
                              task_manager=TaskManager(include_defaults=False), apply_chat_template=task.chat,
                              system_instruction=system_prompt if task.chat else None, log_samples=True,
                              num_fewshot=0, bootstrap_iters=0)
    finally:
        if score is not None:
            score.close()
    seconds = time.perf_counter() - started
    metrics, stderrs = figures_of(out["results"][task.name])
    records = [record(task, s) for s in sorted(out["samples"][task.name], key=lambda s: s["doc"]["_i"])]
    stderr = stderrs.get(task.metric, standard_error([r.score for r in records]))
    return TaskResult(task.name, task.metric, metrics[task.metric], stderr, len(records), metrics, "lm-eval",
                      seconds), records


def figures_of(results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's figures of one task (``"acc,none": 0.5``, ``"acc_stderr,none": 0.1``...) as metric -> value and
    metric -> stderr, in its order; a stderr it could not compute ("N/A", NaN) is left out."""
    metrics, stderrs = {}, {}
    for key, value in results.items():
        name = key.split(",")[0]
        if "," not in key or not isinstance(value, (int, float)) or value != value:
            continue
        if name.endswith("_stderr"):
            stderrs[name.removesuffix("_stderr")] = float(value)
        else:
            metrics[name] = float(value)
    return metrics, stderrs


def record(task: EvalTask, sample: dict[str, Any]) -> ItemRecord:
    doc = sample["doc"]
    if task.kind == "multiple_choice":
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        chosen = max(range(len(lls)), key=lls.__getitem__)
        return ItemRecord(doc["_i"], doc["prompt"], doc["choices"][chosen], doc["choices"][doc["gold"]],
                          float(sample["acc"]), {"loglikelihoods": lls})
    output = sample["filtered_resps"][0]
    return ItemRecord(doc["_i"], doc["prompt"], output if isinstance(output, str) else str(output), doc["target"],
                      float(sample[task.metric]))
