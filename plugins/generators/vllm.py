"""The vLLM generator: a client for a vLLM engine running in its own environment and process.

vLLM pins its own torch and transformers, so the trainer never imports it: the kernel installs a managed
environment (``swiftk env install vllm``) and passes its python; this client starts ``vllm_engine.py`` with it,
in its own process group, and speaks ZeroMQ + msgpack to it (the records in ``vllm_engine.py``).

Prompts are tokenized here with the trainer's tokenizer and rendered like ``hf.py`` renders them, so templates
match training exactly; the engine returns token ids and raw-logit logprobs, and the text is decoded here.

Every start, request and weight sync has a deadline. An engine that dies or hangs is killed (its whole process
group), restarted, given back the last synced weights and adapter (it serves the same version), reported through
``report``, and the request is retried once; then the error is raised. Training never waits on it for ever.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from swiftk.contracts import Adapter, Completion, Message, SamplingParams, Scored, register_generator
from swiftk.contracts.generation import FinishReason
from swiftk.plugins.generators import vllm_engine as wire
from swiftk.plugins.generators.hf import Pair, _first_stop, fit_requests, render_prompts, stop_ids

ENGINE_SCRIPT = Path(__file__).with_name("vllm_engine.py")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
BUCKET_BYTES = 512 * 2**20  # CUDA IPC: tensors travel in flat buffers of about this size


class EngineError(RuntimeError):
    """The vLLM engine failed a request, or could not be (re)started within its deadline."""


@register_generator("vllm")
class VLLMGenerator:
    """Generates with vLLM in its own process; ``load_weights`` pushes full weights or a LoRA adapter to it."""

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, *, python: str | Path, model_dir: str | Path,
                 system_prompt: str | None = None, max_concurrency: int = 64, dtype: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.5,
                 kv_cache_gb: float = 1.0, start_timeout_s: float = 600.0, request_timeout_s: float = 600.0,
                 sync_timeout_s: float = 120.0, engine_args: dict[str, Any] | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        self.model, self.tokenizer, self.system_prompt = model, tokenizer, system_prompt
        self.python, self.model_dir = Path(python), Path(model_dir)
        if not self.python.exists():
            raise EngineError(f"vllm generator: no python at {self.python}; install the environment with "
                              "`swiftk env install vllm` (swiftk.kernel.envs.ensure) and pass its python")
        if not (self.model_dir / "config.json").is_file():
            raise EngineError(f"vllm generator: {self.model_dir} is not an HF model folder (no config.json); build "
                              "one with swiftk.kernel.engine_files.model_folder")
        self.start_timeout_s, self.request_timeout_s = start_timeout_s, request_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self.report = report or (lambda text: None)
        self.stops = stop_ids(tokenizer)
        self.cuda = torch.cuda.is_available()
        self.lora_rank = _lora_rank(model)
        args: dict[str, Any] = {"dtype": dtype, "max_num_seqs": max_concurrency, "generation_config": "vllm",
                                "logprobs_mode": "raw_logprobs", "seed": 0}
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if self.cuda:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            args["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if self.lora_rank:
            args |= {"enable_lora": True, "max_lora_rank": self.lora_rank, "max_loras": 1, "max_cpu_loras": 2}
        self.engine_args = args | (engine_args or {})
        self.workdir = Path(tempfile.mkdtemp(prefix="swiftk-vllm-", dir="/dev/shm" if Path("/dev/shm").is_dir()
                                             else None))
        self._version, self._ids = 0, 0
        self._weights: list[tuple[Path, frozenset[str]]] = []  # full syncs (CPU) a restarted engine replays
        self._cuda_weights: Mapping[str, torch.Tensor] | None = None  # the last full sync (CUDA), re-sent on restart
        self._adapter: Path | None = None  # the last adapter folder
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket: Any = None
        self.ready: wire.ReadyEvent | None = None
        self.restarts, self.closed = 0, False
        self._lock = threading.RLock()  # one request at a time on the socket
        try:
            self._start()
        except _Failed as exc:
            self.close()
            raise EngineError(f"vllm: {exc}") from exc

    @property
    def version(self) -> int:
        return self._version

    # ------------------------------------------------------------------------------------------------ API

    def generate(self, prompts: Sequence[str] | Sequence[list[Message]], sampling: SamplingParams, *,
                 templated: bool = False) -> list[Completion]:
        ids = self._encode(prompts, templated)
        reply = self._call(lambda i: wire.GenerateRequest(i, ids, self._sampling(sampling)), self.request_timeout_s)
        completions = []
        for index, samples in enumerate(reply.samples):
            completions += [self._completion(wire.Sample(**s), index, sampling) for s in samples]
        return completions

    def stream(self, prompt: str | list[Message], sampling: SamplingParams, *,
               templated: bool = False) -> Iterator[str]:
        """The text of one completion as it is generated, cut before a stop string. An engine failure mid-stream
        restarts the engine and raises (text already yielded cannot be taken back)."""
        ids = self._encode([prompt], templated)
        raw = self._sampling(sampling) | {"n": 1}
        hold = max((len(s) for s in sampling.stop), default=1) - 1  # may be the start of a stop string
        tokens: list[int] = []
        text, sent = "", 0
        for reply in self._stream(ids, raw):
            tokens += reply.samples[0][0]["token_ids"]
            text = self._decode(tokens)
            cut = _first_stop(text, sampling.stop)
            end = cut if cut is not None else (len(text) if reply.done else len(text) - hold)
            if end > sent:
                yield text[sent:end]
                sent = end
            if cut is not None:
                break

    def score(self, requests: Sequence[Pair]) -> list[Scored]:
        """log p(continuation | context) of each (context ids, continuation ids) pair, in request order, from the
        engine's prompt logprobs (raw logits, under the served adapter). A pair past the engine's max_model_len - 1
        (it generates one token after the prompt) loses context on the left."""
        max_len = self.ready.max_model_len - 1 if self.ready is not None else None
        fitted = fit_requests(requests, max_len)
        if not fitted:
            return []
        prompts, lengths = [c + x for c, x in fitted], [len(x) for _, x in fitted]
        reply = self._call(lambda i: wire.ScoreRequest(i, prompts, lengths), self.request_timeout_s)
        return [Scored(float(lp), bool(g), n) for lp, g, n in zip(reply.logprobs, reply.greedy, lengths, strict=True)]

    def load_weights(self, version: int, tensors: Mapping[str, torch.Tensor] | None = None,
                     adapter: Adapter | None = None) -> int:
        """Push full ``tensors`` (HF parameter names; a PEFT model's names are mapped) and/or ``adapter``; the engine
        serves ``version`` from its reply on. With neither, the engine keeps its weights and takes the version."""
        path, handles = None, None
        buckets: list[dict[str, Any]] = []
        tensors = hf_names(tensors or {})
        if tensors:
            if any(t.is_cuda for t in tensors.values()):
                buckets, handles = _ipc_buckets(tensors)
                self._cuda_weights = tensors
            else:
                path = self.workdir / f"weights-v{version}.safetensors"
                save_tensors(tensors, path)
        adapter_path = None
        if adapter is not None:
            if not self.engine_args.get("enable_lora"):
                raise EngineError("load_weights: an adapter needs an engine started with LoRA (the model given to "
                                  "the generator has no peft_config, or set engine_args enable_lora/max_lora_rank)")
            adapter_path = write_adapter(adapter, self.workdir / f"adapter-v{version}", str(self.model_dir))
        reply = self._call(lambda i: wire.LoadWeightsRequest(i, version, str(path) if path else None, buckets,
                                                             str(adapter_path) if adapter_path else None),
                           self.sync_timeout_s)
        del handles  # the engine has copied the buckets
        if path is not None:  # kept for a restart; an earlier file whose tensors this one all replaces is not
            for old, names in [w for w in self._weights if w[1] <= set(tensors)]:
                old.unlink(missing_ok=True)
                self._weights.remove((old, names))
            self._weights.append((path, frozenset(tensors)))
        if adapter_path is not None:
            self._replace("_adapter", adapter_path)
        self._version = int(reply.version)
        self.last_sync_s = float(reply.seconds)
        return self._version

    def close(self) -> None:
        """Shut the engine down (request, then SIGTERM, then SIGKILL of its process group) and delete its files."""
        self.closed = True
        self._stop(graceful=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None:
            self._stop(graceful=False)

    # ---------------------------------------------------------------------------------------- the process

    def _start(self) -> None:
        import zmq

        endpoint = f"ipc://{self.workdir}/engine-{self.restarts}.sock"
        self._socket = zmq.Context.instance().socket(zmq.PAIR)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(endpoint)
        # Run from a copy in the work folder: the script's folder is the first import path, and this package's
        # folder holds vllm.py (this file), which would shadow vllm itself. vLLM's worker imports the copy's Reloader.
        script = shutil.copy(ENGINE_SCRIPT, self.workdir / ENGINE_SCRIPT.name)
        env = {**os.environ, "PYTHONPATH": str(self.workdir), "HF_HUB_OFFLINE": "1",
               "VLLM_HOST_IP": "127.0.0.1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CONFIGURE_LOGGING": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        config = {"model": str(self.model_dir), "engine_args": self.engine_args}
        self.log = self.workdir / f"engine-{self.restarts}.log"
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen([str(self.python), str(script), endpoint, json.dumps(config)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        self.report(f"vllm: starting the engine (pid {self._proc.pid}, log {self.log})")
        while True:
            message = self._receive(deadline, "start")
            if isinstance(message, wire.StatusEvent):
                self.report(f"vllm: {message.text}")
            elif isinstance(message, wire.ReadyEvent):
                self.ready = message
                self.report(f"vllm: ready in {message.start_s:.0f} s ({message.device}, vllm {message.vllm_version})")
                break
        if self._version or self._weights or self._adapter or self._cuda_weights:  # a restart: serve the same weights
            buckets, handles = _ipc_buckets(self._cuda_weights) if self._cuda_weights else ([], None)
            paths: list[Path | None] = [path for path, _ in self._weights] or [None]
            for i, path in enumerate(paths):
                last = i == len(paths) - 1
                self._send(wire.LoadWeightsRequest(self._next_id(), self._version, str(path) if path else None,
                                                   buckets if last else [],
                                                   str(self._adapter) if last and self._adapter else None))
                reply = self._receive(time.monotonic() + self.sync_timeout_s, "reload of the last weights")
                if reply.error:
                    raise EngineError(f"vllm: the restarted engine could not reload version {self._version}: "
                                      f"{reply.error}")
            del handles

    def _restart(self, why: str) -> None:
        self.report(f"vllm: {why}; restarting the engine (serving version {self._version})")
        self._stop(graceful=False)
        self.restarts += 1
        self._start()

    def _stop(self, graceful: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if graceful and self._socket is not None:
                try:
                    self._send(wire.ShutdownRequest())
                    proc.wait(timeout=15)
                except (subprocess.TimeoutExpired, Exception):
                    pass
            # A dead or hung engine (perhaps stopped, where SIGTERM waits) goes straight to SIGKILL.
            for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)) if graceful else ((signal.SIGKILL, 10),):
                if proc.poll() is not None:
                    break
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # vLLM's engine-core child, if it outlived its parent
            except (ProcessLookupError, PermissionError):
                pass
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    # ------------------------------------------------------------------------------------------- messages

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _send(self, message: Any) -> None:
        import zmq

        try:  # a PAIR socket blocks a send while no engine is connected: a dead one must not hang the trainer
            self._socket.send(wire.pack(message), zmq.NOBLOCK)
        except zmq.Again as exc:
            raise _Failed(f"the engine is not connected (it exited?); its log ends:\n{_tail(self.log)}") from exc

    def _receive(self, deadline: float, what: str) -> Any:
        """The next message from the engine, or EngineError if it dies or the deadline passes."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed(f"the engine did not answer the {what} within its deadline")
            if self._socket.poll(int(min(left, 0.5) * 1000)):
                return wire.unpack(self._socket.recv())
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise _Failed(f"the engine process exited (code {code}) during the {what}; its log ends:\n"
                              f"{_tail(self.log)}")

    def _call(self, build: Callable[[int], Any], timeout: float) -> Any:
        """Send a request, wait for its reply; a dead or hung engine is restarted and the request retried once."""
        if self.closed:
            raise EngineError("vllm: this generator was closed; build a new one")
        with self._lock:
            return self._call_locked(build, timeout)

    def _call_locked(self, build: Callable[[int], Any], timeout: float) -> Any:
        for attempt in (1, 2):
            request = build(self._next_id())
            try:
                if self._proc is None:
                    raise _Failed("the engine is not running")
                self._send(request)
                deadline = time.monotonic() + timeout
                while True:
                    reply = self._receive(deadline, request.op)
                    if getattr(reply, "id", None) == request.id:
                        break
            except _Failed as exc:
                try:
                    self._restart(str(exc).splitlines()[0])
                except _Failed as again:
                    raise EngineError(f"vllm: the engine could not be restarted: {again}") from exc
                if attempt == 2:
                    raise EngineError(f"vllm: {request.op} failed twice: {exc}") from exc
                continue
            if reply.error:
                raise EngineError(f"vllm: {request.op} failed in the engine: {reply.error}")
            return reply
        raise AssertionError("unreachable")

    def _stream(self, ids: list[list[int]], sampling: dict[str, Any]) -> Iterator[wire.GenerateReply]:
        with self._lock:
            yield from self._stream_locked(ids, sampling)

    def _stream_locked(self, ids: list[list[int]], sampling: dict[str, Any]) -> Iterator[wire.GenerateReply]:
        if self.closed or self._proc is None:
            raise EngineError("vllm: this generator was closed; build a new one")
        request = wire.GenerateRequest(self._next_id(), ids, sampling, stream=True)
        deadline = time.monotonic() + self.request_timeout_s
        try:
            self._send(request)
            while True:
                reply = self._receive(deadline, "stream")
                if getattr(reply, "id", None) != request.id:
                    continue
                if reply.error:
                    raise EngineError(f"vllm: stream failed in the engine: {reply.error}")
                yield reply
                if reply.done:
                    return
        except _Failed as exc:
            self._restart(str(exc).splitlines()[0])
            raise EngineError(f"vllm: the stream was cut: {exc}") from exc

    # ------------------------------------------------------------------------------------------ prompts

    def _encode(self, prompts: Sequence[str | list[Message]], templated: bool) -> list[list[int]]:
        texts, special = render_prompts(self.tokenizer, prompts, templated, self.system_prompt)
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]

    def _sampling(self, s: SamplingParams) -> dict[str, Any]:
        greedy = s.greedy
        return {"max_tokens": s.max_new_tokens, "temperature": 0.0 if greedy else s.temperature,
                "top_p": 1.0 if greedy else s.top_p, "top_k": 0 if greedy else s.top_k, "n": s.n, "seed": s.seed,
                "stop": list(s.stop), "stop_token_ids": self.stops, "logprobs": s.logprobs}

    def _completion(self, s: wire.Sample, index: int, sampling: SamplingParams) -> Completion:
        text = self._decode(s.token_ids)
        cut = _first_stop(text, sampling.stop)
        reason: FinishReason = "stop" if s.finish_reason == "stop" or cut is not None else "length"
        return Completion(text[:cut], list(s.token_ids), s.logprobs if sampling.logprobs else None, reason, index)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _replace(self, attribute: str, path: Path) -> None:
        old = getattr(self, attribute)
        setattr(self, attribute, path)
        if old is not None and old != path:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


class _Failed(Exception):
    """The engine died or missed a deadline (internal: turned into a restart, then EngineError)."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _lora_rank(model: Any) -> int:
    """The max_lora_rank to start vLLM with for a PEFT model's adapters (0: no LoRA)."""
    configs = getattr(model, "peft_config", None) or {}
    ranks = [max([getattr(c, "r", 0), *dict(getattr(c, "rank_pattern", {}) or {}).values()]) for c in configs.values()]
    return max_lora_rank(max(ranks)) if ranks else 0


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def hf_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A PEFT model's names of base weights (``base_model.model.X.base_layer.weight``) as the HF model's (``X.weight``);
    adapter tensors are left out (they travel as an ``Adapter``)."""
    out = {}
    for name, tensor in tensors.items():
        if ".lora_" in name or "lora_embedding" in name:
            continue
        out[name.removeprefix("base_model.model.").replace(".base_layer.", ".")] = tensor
    return out


def write_adapter(adapter: Adapter, out_dir: Path, base_model: str = "") -> Path:
    """A PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) that vLLM's LoRA loader reads,
    from an adapter's tensors (PEFT state-dict names, with or without the adapter's name) and config."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {name.replace(f".{adapter.name}.", "."): t.detach().to("cpu").contiguous()
             for name, t in adapter.tensors.items()}
    settings = dict(adapter.config)  # JSON's types already (Adapter)
    settings.setdefault("peft_type", "LORA")
    settings.setdefault("base_model_name_or_path", base_model)
    settings.setdefault("task_type", "CAUSAL_LM")
    (out_dir / "adapter_config.json").write_text(json.dumps(settings, indent=1))
    save_file(saved, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of ``tensors``; a tensor sharing storage with another (tied embeddings) is written once, under
    the embedding's name: vLLM ties ``lm_head`` to it again."""
    from safetensors.torch import save_file

    seen, out = set(), {}
    for name, tensor in sorted(tensors.items(), key=lambda item: item[0].startswith("lm_head")):  # the embedding
        # keeps its name: with tie_word_embeddings vLLM ignores lm_head.weight
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    save_file(out, str(path), metadata={"format": "pt"})


def _ipc_buckets(tensors: Mapping[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[torch.Tensor]]:
    """CUDA tensors copied into flat uint8 buffers of about ``BUCKET_BYTES`` each, shared with the engine by CUDA IPC
    handles (the buffers returned must stay alive until the engine has answered)."""
    from torch.multiprocessing.reductions import reduce_tensor

    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > BUCKET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor))
        size += (nbytes + 255) // 256 * 256
    buckets, buffers = [], []
    for group in groups:
        layout, offset = [], 0
        for name, tensor in group:
            nbytes = tensor.numel() * tensor.element_size()
            layout.append((name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), offset, nbytes))
            offset += (nbytes + 255) // 256 * 256  # aligned, so every dtype view of the slice is valid
        flat = torch.empty(offset, dtype=torch.uint8, device=group[0][1].device)
        for (_, tensor), (_, _, _, start, nbytes) in zip(group, layout, strict=True):
            flat[start : start + nbytes].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
        buffers.append(flat)
        buckets.append({"handle": pickle.dumps(reduce_tensor(flat)),  # type: ignore[no-untyped-call]
                        "tensors": layout})
    torch.cuda.synchronize()
    return buckets, buffers
