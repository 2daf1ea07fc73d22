"""``[train] compile``: ``torch.compile`` of the model's repeated blocks, with a way back to eager.

What is compiled is the ``forward`` of each block of the decoder's stack (each ``LlamaDecoderLayer``...), one
block at a time, as torchtitan does: the blocks share one compiled graph (their code is the same and their
weights are its inputs), hooks that engines put on the blocks (FSDP2's gather, DDP's) stay outside it, the
state dict keeps its names (no ``_orig_mod.``), and the parts that change per model or per plugin (the
embeddings, the head, the chunked loss, the stage's maths) run eagerly around it. Compiled code runs only
where gradients are on (training steps and gradient checkpointing's recomputation); evaluation and generation
run the same blocks eagerly, since their shapes change with every token and would recompile more than they
save.

A block that cannot be compiled falls back, and says why:
- before training, the whole model runs eagerly when no repeated stack is found, or when its weights are
  partitioned outside the blocks' own forward (DeepSpeed ZeRO-3 gathers them in hooks on every layer);
- at the first compiled step, an error from the compiler (a plugin's code that dynamo cannot trace with
  ``fullgraph = true``, a backend that fails) switches every block back to eager, the step runs eagerly and the
  console says what failed;
- graph breaks (code dynamo runs eagerly between compiled pieces: a ``.item()`` in a patched layer, a print)
  are reported once, after the first compiled step, with the file and line that caused each.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any

import torch

GRAPH_BREAKS = "torch._dynamo.symbolic_convert.__graph_breaks"  # torch's logger of each break, with its site
OPTIONS = frozenset(inspect.signature(torch.compile).parameters) - {"model"}


def compile_options(options: dict[str, Any]) -> str:
    """Why ``[train] compile_config`` cannot be given to ``torch.compile`` (empty when it can)."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        return f"{', '.join(unknown)} not among torch.compile's arguments ({', '.join(sorted(OPTIONS))})"
    backend = options.get("backend", "inductor")
    if isinstance(backend, str) and backend not in torch._dynamo.list_backends(exclude_tags=()):
        return f"backend {backend!r} is not one of {', '.join(torch._dynamo.list_backends())}"
    return ""


def repeated_blocks(model: torch.nn.Module) -> tuple[torch.nn.ModuleList | None, str]:
    """The longest ``ModuleList`` of modules of one class (the decoder's layers), or None and why."""
    best: torch.nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and \
                len({type(block) for block in module}) == 1 and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        return None, f"{type(model).__name__} has no stack of repeated blocks to compile"
    if any(hasattr(p, "ds_id") for p in best.parameters()):
        return None, "DeepSpeed ZeRO-3 partitions the weights and gathers them in hooks on every layer, " \
                     "inside the blocks; compile with ddp, fsdp or ZeRO-1/2"
    return best, ""


class CompiledBlocks:
    """The blocks of one model, each running its compiled ``forward`` while gradients are on."""

    def __init__(self, blocks: torch.nn.ModuleList, options: dict[str, Any], say: Callable[[str], None]) -> None:
        self.blocks, self.options, self.say = blocks, options, say
        self.eager = False  # True once compiling failed: every block runs its own forward again
        self.reported = False
        self.breaks: list[str] = []
        self.calls = 0  # compiled calls made (tests and the bench read it)
        for block in blocks:
            block.forward = self.guarded(block.forward)  # an instance attribute: state dict and hooks unchanged

    @classmethod
    def apply(cls, model: torch.nn.Module, options: dict[str, Any],
              say: Callable[[str], None]) -> CompiledBlocks | None:
        blocks, why = repeated_blocks(model)
        if blocks is None:
            say(f"compile: off ({why}); the model runs eagerly")
            return None
        say(f"compile: {len(blocks)} x {type(blocks[0]).__name__} with torch.compile"
            f"({', '.join(f'{k}={v!r}' for k, v in options.items())}); compiled at the first step")
        return cls(blocks, options, say)

    def guarded(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        compiled = torch.compile(forward, **self.options)

        def run(*args: Any, **kwargs: Any) -> Any:
            if self.eager or not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            try:
                with self.watching():
                    out = compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as exc:
                self.fall_back(exc)
                return forward(*args, **kwargs)
            self.calls += 1
            return out

        return run

    def watching(self) -> Any:
        """While the first compiled call traces: collect torch's graph-break records."""
        return _Collect(self.breaks) if not self.reported else contextlib.nullcontext()

    def fall_back(self, exc: BaseException) -> None:
        self.eager = True
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2] or [type(exc).__name__]
        site = _user_site(exc)
        site = f" at {site}" if site else ""
        self.say(f"compile: failed, the model runs eagerly from here ({type(exc).__name__}{site}: "
                 f"{' '.join(lines)[:300]}). Fix that code, or leave fullgraph out of compile_config to let torch "
                 "run it eagerly between compiled pieces.")

    def report(self) -> None:
        """Once, after the first compiled step: the graph breaks, where and why (nothing when there were none)."""
        if self.reported or self.eager or self.calls == 0:
            return
        self.reported = True
        sites = list(dict.fromkeys(_summary(record) for record in self.breaks))
        if sites:
            self.say(f"compile: {len(sites)} graph break(s) in {type(self.blocks[0]).__name__}.forward; that code "
                     "runs eagerly between compiled pieces: " + "; ".join(sites[:5]))


def _summary(record: str) -> str:
    """``FILE:LINE: reason`` from one of torch's graph-break records."""
    lines = [line.strip() for line in record.splitlines() if line.strip()]
    site = next((line.split(" at ", 1)[1] for line in lines if line.startswith("Graph break in user code at ")), "")
    reason = next((line for line in lines if not line.startswith(("Graph break", "Graph Break"))), "")
    return f"{site}: {reason[:200]}" if site else reason[:200]


def _user_site(exc: BaseException) -> str:
    """``file:line`` of the user code a dynamo error blames, if it says."""
    stack = getattr(exc, "real_stack", None)
    if stack:
        return f"{stack[-1].filename}:{stack[-1].lineno}"
    sites = re.findall(r'File "([^"]+)", line (\d+)', str(exc))
    return f"{sites[-1][0]}:{sites[-1][1]}" if sites else ""


class _Collect(logging.Handler):
    """Takes torch's graph-break records for as long as it is entered, without printing them."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into
        self.logger = logging.getLogger(GRAPH_BREAKS)

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())

    def __enter__(self) -> _Collect:
        self.saved = (self.logger.level, self.logger.propagate)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
