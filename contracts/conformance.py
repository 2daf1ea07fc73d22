"""Conformance checks: does a plugin keep the hook contract? Run on tiny synthetic inputs, no model needed.

``check(plugin_or_spec)`` registers the plugin in a fresh plugin manager (pluggy itself rejects unknown
``swiftk_*`` hooks and arguments a hook does not pass), then calls every hook it implements with keyword
arguments, as the kernel does, and inspects what comes back: a loss is a finite 0-dim tensor that
back-propagates to the logits; an optimizer moves the parameters and its ``state_dict`` round-trips; eval
hooks return float metrics; rewards give one float per completion; plugin state survives a checkpoint.
Each problem is a ``Finding`` naming the plugin, the hook, what was wrong and how to fix it.

The ``tiny_*`` helpers build the same inputs for a plugin author's own tests (see ``swiftk.contracts.testing``).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import io
import math
import tempfile
import traceback
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from inspect import Parameter
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pluggy
import torch
from pydantic import TypeAdapter, ValidationError

from swiftk.contracts import hookspecs, registry
from swiftk.contracts.checks import FIX_GRAD, ContractViolation, checked_loss
from swiftk.contracts.markers import CONTRACT_VERSION, PROJECT_NAME
from swiftk.contracts.registry import PluginSpec, contract_problem
from swiftk.contracts.types import IGNORE_INDEX, Batch, ModelOutputs, StepState

LR = 1e-2  # the peak lr an optimizer under test is built with
CONTRACT = ".".join(CONTRACT_VERSION.split(".")[:2])  # what a plugin declares: SWIFTK_CONTRACT = "0.1"


@dataclass(frozen=True)
class Finding:
    """One way a plugin breaks the contract."""

    plugin: str  # "loss:focal", a module or a class name
    hook: str  # the hook (or "build", "state_dict", "SWIFTK_CONTRACT") where it showed
    message: str
    fix: str

    def __str__(self) -> str:
        return f"plugin '{self.plugin}' (hook {self.hook}) {self.message}. Fix: {self.fix}."


# ------------------------------------------------------------------------------------------ tiny inputs


def tiny_batch(batch: int = 2, length: int = 6, vocab: int = 11, seed: int = 0) -> Batch:
    """``batch`` rows of ``length`` random tokens: the first two are an unscored prompt, and the last row
    ends in one padding token (masked, label ``IGNORE_INDEX``). ``num_items_in_batch`` is its label count."""
    if length < 4:
        raise ValueError(f"length must be >= 4 (two prompt tokens and scored ones), got {length}")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, vocab, (batch, length), generator=gen)  # [B, T]; 0 is the pad id
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :2] = IGNORE_INDEX
    if batch > 1:
        input_ids[-1, -1], attention_mask[-1, -1], labels[-1, -1] = 0, 0, IGNORE_INDEX
    tiny = Batch(input_ids, labels, attention_mask, num_items_in_batch=0)
    tiny.num_items_in_batch = tiny.num_label_tokens
    return tiny


def tiny_outputs(batch: Batch, vocab: int | None = None, seed: int = 0) -> ModelOutputs:
    """Random logits ``[B, T, V]`` for ``batch``: a leaf tensor that requires grad, so a test can check
    ``outputs.logits.grad`` after ``loss.backward()``. ``V`` defaults to ``tiny_batch``'s vocabulary."""
    size = vocab if vocab is not None else max(11, int(batch.input_ids.max()) + 1)
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch.input_ids.shape, size, generator=gen)  # [B, T, V]
    return ModelOutputs(logits.requires_grad_(True))


def tiny_state(tmp_dir: str | Path) -> StepState:
    """A run at step 0 of 10 whose run directory is ``tmp_dir``."""
    return StepState(step=0, max_steps=10, epoch=0, lr=1e-3, tokens_seen=0, elapsed_s=0.0, run_dir=str(tmp_dir))


def tiny_model(seed: int = 0) -> torch.nn.Linear:
    """A 4 -> 3 linear layer with seeded weights (the global RNG is left alone)."""
    model = torch.nn.Linear(4, 3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


def tiny_param_groups(model: torch.nn.Module, weight_decay: float = 0.01) -> list[dict[str, Any]]:
    """The kernel's two groups: matrices with weight decay, vectors (biases, norms) without."""
    groups: list[dict[str, Any]] = [{"params": [], "names": [], "weight_decay": weight_decay},
                                    {"params": [], "names": [], "weight_decay": 0.0}]
    for name, param in model.named_parameters():
        group = groups[0] if param.dim() >= 2 else groups[1]
        group["params"].append(param)
        group["names"].append(name)
    return groups


def _train_step(model: torch.nn.Module, optimizer: Any) -> None:
    inputs = torch.linspace(-1, 1, 8).reshape(2, 4)  # [2, 4]
    loss = (model(inputs) - 0.5).pow(2).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


# ------------------------------------------------------------------------------------------ check


def check(
    obj_or_spec: object,
    config: Mapping[str, Any] | None = None,
    *,
    name: str | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> list[Finding]:
    """Every way ``obj_or_spec`` breaks the hook contract on tiny inputs (empty: it conforms).

    ``obj_or_spec`` is a registry ``PluginSpec`` or a class (built with their defaults updated by
    ``config``), or a built plugin: an object or module with ``@hookimpl`` functions. ``inputs`` replaces
    hook arguments (``{"batch": my_batch}``) for plugins that need more than a plain SFT batch.
    """
    config = dict(config or {})
    label = name or plugin_label(obj_or_spec)
    findings: list[Finding] = []
    problem = contract_problem(declared_contract(obj_or_spec))
    if problem:
        findings.append(Finding(label, "SWIFTK_CONTRACT", problem,
                                f'port the plugin to contract {CONTRACT} and set SWIFTK_CONTRACT = "{CONTRACT}"'))
    try:
        plugin = _instantiate(obj_or_spec, config)
    except Exception as exc:
        return findings + [Finding(label, "build", f"could not be built with config {config}: {describe(exc)}",
                                   "give every constructor or factory argument a default, or pass it in config")]
    impls, problems = validated_hookimpls(label, plugin)
    findings += problems
    if not impls and not problems:
        findings.append(Finding(label, "hookimpl", "implements no swiftk hook",
                                "name a method after a hook in swiftk.contracts.hookspecs and mark it with @hookimpl"))
    fresh = _fresh_copy(obj_or_spec, plugin, config)
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    manager.register(SimpleNamespace(**impls), name=label)
    with tempfile.TemporaryDirectory(prefix="swiftk-check-") as tmp:
        calls = _Calls(manager, label, Path(tmp), dict(inputs or {}))
        for hooks, run in _CHECKS:
            implemented = sorted(set(hooks) & set(impls))
            try:
                if implemented:
                    run(calls, set(impls))
            except Exception as exc:  # what the plugin returned broke the check itself
                calls.fail(implemented[0], f"made the check fail: {describe(exc)}",
                           "call the hook on the conformance.tiny_* inputs and inspect what it returns")
        findings += calls.findings
        findings += state_findings(label, plugin, fresh)
    return findings


def plugin_label(obj: object) -> str:
    if isinstance(obj, PluginSpec):
        return f"{obj.kind}:{obj.name}"
    if isinstance(obj, ModuleType):
        file = getattr(obj, "__file__", None)
        return Path(file).stem if file and obj.__name__.startswith("swiftk_user_plugin_") else obj.__name__
    return obj.__name__ if isinstance(obj, type) else type(obj).__name__


def declared_contract(obj: object) -> str | None:
    """The contract version a plugin or registry entry declares (see ``registry.declared_contract``)."""
    return obj.contract if isinstance(obj, PluginSpec) else registry.declared_contract(obj)


def describe(exc: BaseException) -> str:
    """``ValueError at plugin.py:12: message``: the innermost frame, on one line."""
    if isinstance(exc, SyntaxError):
        return f"SyntaxError at {exc.filename}:{exc.lineno}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}: {exc}"


def _instantiate(obj: object, config: dict[str, Any]) -> object:
    if isinstance(obj, PluginSpec):
        return obj.build(**config)
    if isinstance(obj, type):
        return obj(**config)
    if config:
        raise TypeError("config was given for a plugin that is already built; pass its class or PluginSpec")
    return obj


def _fresh_copy(obj: object, plugin: object, config: dict[str, Any]) -> object | None:
    """A second, untouched instance to load a ``state_dict`` into (None: load into ``plugin`` itself)."""
    try:
        return _instantiate(obj, config) if obj is not plugin else copy.deepcopy(plugin)
    except Exception:  # modules and objects holding locks cannot be copied
        return None


def validated_hookimpls(label: str, plugin: object) -> tuple[dict[str, Callable[..., Any]], list[Finding]]:
    """The plugin's ``@hookimpl`` functions that pluggy accepts, and a Finding for each one it rejects
    (unknown hook, argument the hook does not pass) or that lacks the marker. Each is registered alone, so
    that every problem is reported, not just the first."""
    known = hookspecs.hook_names()
    impls: dict[str, Callable[..., Any]] = {}
    findings: list[Finding] = []
    for attr in dir(plugin):
        impl = getattr(plugin, attr, None) if attr.startswith("swiftk_") else None
        if not callable(impl):
            continue
        close = difflib.get_close_matches(attr, known, n=1)
        rename = f"rename it to {close[0]}" if close else "use a hook name from swiftk.contracts.hookspecs"
        if getattr(impl, f"{PROJECT_NAME}_impl", None) is None:
            fix = "mark it with @hookimpl (from swiftk.contracts import hookimpl)"
            findings.append(Finding(label, attr, "is not marked with @hookimpl, so the kernel never calls it",
                                    fix if attr in known else f"{fix} and {rename}"))
            continue
        manager = pluggy.PluginManager(PROJECT_NAME)
        manager.add_hookspecs(hookspecs)
        try:
            manager.register(SimpleNamespace(**{attr: impl}), name=label)
            manager.check_pending()
        except pluggy.PluginValidationError as exc:
            findings.append(_rejected(label, attr, impl, exc, rename))
            continue
        impls[attr] = impl
    return impls, findings


def _rejected(label: str, attr: str, impl: Callable[..., Any], exc: Exception, rename: str) -> Finding:
    spec = getattr(hookspecs, attr, None)
    if spec is None:
        return Finding(label, attr, f"is not a swiftk hook (pluggy: unknown hook '{attr}')", rename)
    allowed = list(inspect.signature(spec).parameters)
    extra = [p for p in inspect.signature(impl).parameters if p not in allowed]
    if extra:
        return Finding(label, attr, f"takes {', '.join(extra)}, which the hook does not pass",
                       f"drop {', '.join(extra)}; it may take any of: {', '.join(allowed)}")
    return Finding(label, attr, f"was rejected by pluggy: {' '.join(str(exc).split())}",
                   "see the hookimpl options in the pluggy documentation")


# ------------------------------------------------------------------------------------------ hook calls


class _Calls:
    """Calls hooks through the plugin manager, as the kernel does, and collects findings."""

    def __init__(self, manager: pluggy.PluginManager, label: str, tmp: Path, inputs: dict[str, Any]) -> None:
        self.manager, self.label, self.tmp, self.inputs = manager, label, tmp, inputs
        self.state: StepState = inputs.get("state") or tiny_state(tmp)
        self.findings: list[Finding] = []

    def fail(self, hook: str, message: str, fix: str) -> None:
        self.findings.append(Finding(self.label, hook, message, fix))

    def call(self, hook: str, **kwargs: Any) -> tuple[bool, Any]:
        """(True, result) or (False, None) when the hook raised. One-result hooks give the result or None."""
        kwargs |= {k: v for k, v in self.inputs.items() if k in kwargs and k != "outputs"}
        caller = getattr(self.manager.hook, hook)
        try:
            result = caller(**kwargs)
        except Exception as exc:
            self.fail(hook, f"raised {describe(exc)}",
                      "make it work on swiftk.contracts.conformance.tiny_batch/tiny_outputs/tiny_state inputs")
            return False, None
        if isinstance(result, list):  # an all-results hook: this plugin is the only one registered
            result = result[0] if result else None
        return True, result

    def float_dict(self, hook: str, value: object, what: str) -> None:
        if not isinstance(value, Mapping):
            self.fail(hook, f"returned {type(value).__name__} for {what}; expected a dict[str, float]",
                      "return a dict of plain floats, or None")
            return
        for key, item in value.items():
            if not isinstance(key, str) or isinstance(item, bool) or not isinstance(item, float | int):
                self.fail(hook, f"returned {what} {key!r}: {type(item).__name__}, not a float",
                          "convert each value with float(...) (tensor.item() for a tensor), keys must be str")


def _check_loss(calls: _Calls, hooks: set[str]) -> None:
    hook = "swiftk_loss_compute"
    batch = calls.inputs.get("batch") or tiny_batch()
    outputs = calls.inputs.get("outputs") or tiny_outputs(batch)
    logits = outputs.logits.detach().clone().requires_grad_(True)  # a leaf, whatever was passed in
    ok, result = calls.call(hook, batch=batch, outputs=ModelOutputs(logits, outputs.extras), step=0,
                            state=calls.state)
    if not ok:
        return
    try:
        loss = checked_loss(result).loss  # the contract every caller of the hook enforces
    except ContractViolation as exc:
        calls.fail(hook, f"{exc} (on a plain SFT micro-batch)", exc.fix)
        return
    torch.autograd.backward(loss)
    if logits.grad is None or not bool(logits.grad.abs().sum() > 0):
        calls.fail(hook, "returned a loss whose gradient w.r.t. outputs.logits is zero", FIX_GRAD)
    elif not bool(torch.isfinite(logits.grad).all()):
        calls.fail(hook, "returned a loss whose gradient w.r.t. outputs.logits is not finite",
                   "guard logs and divisions so the backward pass stays finite")


def _build_optimizer(calls: _Calls, model: torch.nn.Module) -> Any:
    ok, opt = calls.call("swiftk_optimizer_build", param_groups=tiny_param_groups(model), lr=LR, model=model)
    if ok and not isinstance(opt, torch.optim.Optimizer):
        calls.fail("swiftk_optimizer_build", f"returned {type(opt).__name__}; expected a torch.optim.Optimizer",
                   "return an Optimizer subclass, so the kernel can schedule and checkpoint it")
        return None
    return opt


def _check_optimizer(calls: _Calls, hooks: set[str]) -> None:
    hook = "swiftk_optimizer_build"
    model = tiny_model()
    opt = _build_optimizer(calls, model)
    if opt is None:
        return
    if any("lr" not in group for group in opt.param_groups):
        calls.fail(hook, "built param groups without an 'lr'", "pass defaults=dict(lr=lr, ...) to Optimizer")
    before = [p.detach().clone() for p in model.parameters()]
    try:
        _train_step(model, opt)
        _train_step(model, opt)  # twice, so that stateful optimizers have history to save
    except Exception as exc:
        calls.fail(hook, f"built an optimizer whose step() raised {describe(exc)}", "make step() work on the groups")
        return
    if all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)):
        calls.fail(hook, f"built an optimizer whose step() left every parameter unchanged (lr {LR}, nonzero grads)",
                   "update each p in group['params'] that has a p.grad, in place, under torch.no_grad()")
        return
    twin = copy.deepcopy(model)
    twin_opt = _build_optimizer(calls, twin)
    if twin_opt is None:
        return
    saved = copy.deepcopy(opt.state_dict())
    fix = ("keep per-parameter state in self.state[p] and hyper-parameters in param_groups, or override "
           "state_dict() and load_state_dict() together")
    try:
        twin_opt.load_state_dict(copy.deepcopy(saved))
    except Exception as exc:
        calls.fail(hook, f"built an optimizer whose load_state_dict(state_dict()) raised {describe(exc)}", fix)
        return
    if not same(twin_opt.state_dict(), saved):
        calls.fail(hook, "built an optimizer whose state_dict() does not round-trip: a fresh optimizer that "
                   "loaded it reports another state", fix)
        return
    _train_step(model, opt)
    _train_step(twin, twin_opt)
    if not all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True)):
        calls.fail(hook, "built an optimizer whose state_dict() misses state: after loading it, a fresh "
                   "optimizer's next step differs from the original's", fix)


def _check_scheduler(calls: _Calls, hooks: set[str]) -> None:
    hook = "swiftk_scheduler_build"

    def build() -> tuple[torch.optim.Optimizer, Any]:
        opt = torch.optim.SGD(tiny_model().parameters(), lr=LR)
        ok, sched = calls.call(hook, optimizer=opt, total_steps=10, warmup_steps=2)
        if ok and not (callable(getattr(sched, "step", None)) and callable(getattr(sched, "state_dict", None))):
            calls.fail(hook, f"returned {type(sched).__name__}; expected a torch.optim.lr_scheduler.LRScheduler",
                       "return an LRScheduler (LambdaLR wraps any factor function)")
            sched = None
        return opt, sched

    opt, sched = build()
    if sched is None:
        return
    lrs: list[float] = []
    saved: dict[str, Any] = {}
    try:
        for step in range(10):
            opt.step()
            sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
            if step == 2:
                saved = copy.deepcopy(sched.state_dict())
    except Exception as exc:
        calls.fail(hook, f"built a scheduler whose step() raised {describe(exc)}", "make step() work for 10 steps")
        return
    bad = [(i, lr) for i, lr in enumerate(lrs) if not math.isfinite(lr) or lr < 0]
    if bad:
        calls.fail(hook, f"set lr {bad[0][1]} at step {bad[0][0]}", "keep the lr finite and >= 0")
    twin_opt, twin = build()
    if twin is not None:
        try:
            twin.load_state_dict(saved)
            twin_opt.step()
            twin.step()
        except Exception as exc:
            calls.fail(hook, f"built a scheduler whose load_state_dict(state_dict()) raised {describe(exc)}",
                       "accept exactly what state_dict() returns")
            return
        if not math.isclose(float(twin_opt.param_groups[0]["lr"]), lrs[3], rel_tol=1e-9):
            calls.fail(hook, "built a scheduler whose state_dict() does not resume the schedule",
                       "keep the step count in last_epoch (LRScheduler does) or save it in state_dict()")


def _eval_pass(calls: _Calls) -> tuple[bool, Any]:
    calls.call("swiftk_eval_start", state=calls.state)
    for seed in (0, 1):
        batch = calls.inputs.get("batch") or tiny_batch(seed=seed)
        given = calls.inputs.get("outputs") or tiny_outputs(batch, seed=seed)
        outputs = ModelOutputs(given.logits.detach(), given.extras)  # the kernel evaluates under no_grad
        calls.call("swiftk_eval_batch", batch=batch, outputs=outputs, state=calls.state)
    calls.call("swiftk_eval_predictions", prompts=["2+2=", "3+4="], predictions=["4", "8"],
               references=["4", "7"], state=calls.state)
    return calls.call("swiftk_eval_end", state=calls.state)


def _check_eval(calls: _Calls, hooks: set[str]) -> None:
    hook = "swiftk_eval_end"
    if hook not in hooks:
        calls.fail(sorted(hooks & set(EVAL_HOOKS))[0], "accumulates eval data but has no swiftk_eval_end, so "
                   "its metrics are never reported", "add @hookimpl def swiftk_eval_end(self, state) -> dict")
        return
    found = len(calls.findings)
    ok, first = _eval_pass(calls)
    if not ok or first is None:
        return
    calls.float_dict(hook, first, "metric")
    if len(calls.findings) > found:
        return
    ok, second = _eval_pass(calls)
    if ok and not same(first, second):
        calls.fail("swiftk_eval_start", f"left state from the last pass: two identical eval passes gave {first} "
                   f"then {second}", "reset the accumulators in @hookimpl swiftk_eval_start(self, state)")


def _check_step_end(calls: _Calls, hooks: set[str]) -> None:
    metrics = {"loss": 2.5, "lr": 1e-3, "grad_norm": 1.0}
    ok, result = calls.call("swiftk_step_end", state=calls.state, metrics=metrics)
    if ok and result is not None:
        calls.float_dict("swiftk_step_end", result, "metric")


def _check_reward(calls: _Calls, hooks: set[str]) -> None:
    hook = "swiftk_reward_compute"
    completions = ["4", "seven", ""]
    ok, result = calls.call(hook, prompts=["2+2=", "3+4=", "5+1="], completions=completions,
                            references=["4", "7", None], state=calls.state)
    if not ok or result is None:
        return
    fix = "return {reward_name: [r_0, ..., r_{n-1}]}, one float per completion, in order"
    if not isinstance(result, Mapping):
        calls.fail(hook, f"returned {type(result).__name__}; expected dict[str, list[float]]", fix)
        return
    for key, scores in result.items():
        if not isinstance(scores, list | tuple) or len(scores) != len(completions):
            size = len(scores) if isinstance(scores, list | tuple) else type(scores).__name__
            calls.fail(hook, f"returned {size} scores under {key!r} for {len(completions)} completions", fix)
        elif not all(isinstance(s, float | int) and not isinstance(s, bool) for s in scores):
            calls.fail(hook, f"returned non-float scores under {key!r}: {scores!r}", fix)


def _check_start(calls: _Calls, hooks: set[str]) -> None:
    """Start-up hooks: they must run, and a replacement (row, batch, model) must have the right type."""
    batch = tiny_batch()
    model = tiny_model()
    calls.call("swiftk_run_start", config={}, state=calls.state)
    ok, row = calls.call("swiftk_data_row", row={"prompt": "2+2=", "completion": "4"}, split="train")
    if ok and row is not None and not isinstance(row, Mapping):
        calls.fail("swiftk_data_row", f"returned {type(row).__name__}; expected a dict row or None",
                   "return the replacement row as a dict")
    samples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    ok, collated = calls.call("swiftk_data_collate", samples=samples, pad_id=0)
    if ok and collated is not None and (not isinstance(collated, Batch) or collated.input_ids.dim() != 2
                                        or collated.labels.shape != collated.input_ids.shape):
        calls.fail("swiftk_data_collate", "did not return a Batch with [B, T] input_ids and labels of one shape",
                   "return Batch(input_ids, labels, attention_mask, num_items_in_batch=0)")
    ok, replaced = calls.call("swiftk_model_loaded", model=model, tokenizer=None, config={})
    if ok and replaced is not None and not isinstance(replaced, torch.nn.Module):
        calls.fail("swiftk_model_loaded", f"returned {type(replaced).__name__}; expected a torch.nn.Module or None",
                   "patch the model in place and return None, or return the replacement module")
    calls.call("swiftk_batch_start", batch=batch, step=0, state=calls.state)


def _check_end(calls: _Calls, hooks: set[str]) -> None:
    """Checkpoint and end-of-run hooks, called last, as in a run."""
    (calls.tmp / "checkpoint").mkdir(exist_ok=True)
    calls.call("swiftk_checkpoint_save", state=calls.state, path=str(calls.tmp / "checkpoint"))
    calls.call("swiftk_checkpoint_load", state=calls.state, path=str(calls.tmp / "checkpoint"))
    calls.call("swiftk_run_end", state=calls.state, status="completed")


EVAL_HOOKS = ("swiftk_eval_start", "swiftk_eval_batch", "swiftk_eval_predictions", "swiftk_eval_end")
START_HOOKS = ("swiftk_run_start", "swiftk_data_row", "swiftk_data_collate", "swiftk_model_loaded",
               "swiftk_batch_start")
END_HOOKS = ("swiftk_checkpoint_save", "swiftk_checkpoint_load", "swiftk_run_end")
_CHECKS: list[tuple[tuple[str, ...], Callable[[_Calls, set[str]], None]]] = [  # in the order of a run
    (START_HOOKS, _check_start),
    (("swiftk_loss_compute",), _check_loss),
    (("swiftk_optimizer_build",), _check_optimizer),
    (("swiftk_scheduler_build",), _check_scheduler),
    (("swiftk_step_end",), _check_step_end),
    (EVAL_HOOKS, _check_eval),
    (("swiftk_reward_compute",), _check_reward),
    (END_HOOKS, _check_end),
]


# ------------------------------------------------------------------------------------------ plugin state


def state_findings(label: str, plugin: object, fresh: object | None) -> list[Finding]:
    """A plugin's ``state_dict()`` survives the kernel's checkpoint (``torch.save``) and restores it."""
    save, load = getattr(plugin, "state_dict", None), getattr(plugin, "load_state_dict", None)
    if not callable(save) and not callable(load):
        return []
    if not (callable(save) and callable(load)):
        have, lack = ("state_dict", "load_state_dict") if callable(save) else ("load_state_dict", "state_dict")
        return [Finding(label, lack, f"has {have}() but no {lack}(), so its state is not restored on resume",
                        "define both, or neither")]
    try:
        saved = save()
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        buffer.seek(0)
        restored = torch.load(buffer, weights_only=False)
    except Exception as exc:
        return [Finding(label, "state_dict", f"returned state that a checkpoint cannot store: {describe(exc)}",
                        "return plain data: numbers, strings, lists, dicts and tensors")]
    target = fresh if fresh is not None and callable(getattr(fresh, "load_state_dict", None)) else plugin
    try:
        target.load_state_dict(restored)  # type: ignore[attr-defined]
        reloaded = target.state_dict()  # type: ignore[attr-defined]
    except Exception as exc:
        return [Finding(label, "load_state_dict", f"raised {describe(exc)} on its own state_dict()",
                        "accept exactly what state_dict() returns")]
    if not same(reloaded, saved):
        return [Finding(label, "load_state_dict", f"does not restore the state: saved {saved!r}, a fresh instance "
                        f"reports {reloaded!r} after loading it", "restore every key that state_dict() saves")]
    return []


def same(a: object, b: object) -> bool:
    """Deep equality over dicts, sequences, tensors and floats (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return False
        if a.dtype != b.dtype or torch.equal(a, b):
            return a.dtype == b.dtype
        same_nans = torch.equal(a.isnan(), b.isnan())
        return a.is_floating_point() and same_nans and torch.equal(a.nan_to_num(), b.nan_to_num())
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def config_problems(spec: PluginSpec, config: dict[str, Any]) -> list[str]:
    """Unknown, missing or mistyped arguments of ``config`` for the plugin's constructor or factory."""
    signature = spec.config_signature()
    try:
        bound = signature.bind(**config)
    except TypeError as exc:
        accepted = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name
                             for p in signature.parameters.values()) or "no arguments"
        return [f"{exc}; it accepts: {accepted}"]
    try:
        target = typing.cast(Any, spec.target).__init__ if isinstance(spec.target, type) else spec.target
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: names and arity were still checked
        return []
    problems = []
    for name, value in bound.arguments.items():
        if name in hints and signature.parameters[name].kind not in (Parameter.VAR_KEYWORD, Parameter.VAR_POSITIONAL):
            try:
                TypeAdapter(hints[name]).validate_python(value)
            except ValidationError as exc:
                expected = getattr(hints[name], "__name__", str(hints[name]))
                problems.append(f"{name} = {value!r} is not a valid {expected} ({exc.errors()[0]['msg']})")
    return problems


def spec_problems(spec: PluginSpec, config: dict[str, Any]) -> list[str]:
    """Everything that stops ``spec`` from being built with ``config``: its arguments, the contract version it
    declares, its hook methods. The checks a kernel, a plugin host and a hot reload run alike."""
    problems = config_problems(spec, config)
    problem = contract_problem(spec.contract)
    if problem:
        problems.append(problem)
    if spec.is_hook_class:
        problems += hookimpl_problems(spec.target)
    return problems


def hookimpl_problems(target: object) -> list[str]:
    """``swiftk_*`` attributes that are not hooks, miss the @hookimpl marker, or take arguments the hook
    does not pass (the plugin author's conformance checks, run on the class or module itself)."""
    label = getattr(target, "__name__", type(target).__name__)
    # A class is checked through a bare instance (no __init__ run), so its methods are bound and `self` is
    # not mistaken for a hook argument.
    subject = typing.cast(Any, target).__new__(target) if isinstance(target, type) else target
    _, findings = validated_hookimpls(label, subject)
    return [f"{f.hook} {f.message}; fix: {f.fix}" for f in findings]
