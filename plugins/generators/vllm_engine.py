"""The vLLM engine process: started by path with the managed environment's python, spoken to over ZeroMQ + msgpack.

    <env>/bin/python plugins/generators/vllm_engine.py ENDPOINT CONFIG_JSON

It imports only the standard library, zmq, msgpack and (inside functions) vLLM and torch: swiftk is not installed
in the engine's environment, and this file is also imported by the trainer-side client (``vllm.py``) for the
message records below, where vLLM is absent. The engine connects a PAIR socket to ``ENDPOINT`` (bound by the
client), reports its start (``StatusEvent``), builds ``vllm.LLM``, says ``ReadyEvent`` and answers requests one
at a time until ``ShutdownRequest``, or until the client's process is gone.

Prompts arrive as token ids (the trainer's tokenizer, so templates match training exactly); replies carry token
ids, the log-probability of each chosen token under the raw logits (``logprobs_mode = "raw_logprobs"``, as
``hf.py`` computes them) and finish reasons; the client decodes the text. A score request reads the prompt logprobs
of given continuations (vLLM computes them from the raw logits in every logprobs mode but the logits ones).

Weights: a full sync is read by a worker extension (``Reloader``) from a safetensors file the client wrote, or on
CUDA from IPC handles of buckets in the client's GPU memory, and loaded in place with ``reload_weights`` (a
worker's ``load_weights`` fails on CPU, where weights are repacked). An adapter sync is a PEFT folder served by a
``LoRARequest`` whose id is the version.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# ----------------------------------------------------------------------------------------- wire messages


@dataclass(frozen=True)
class StatusEvent:
    text: str  # what the engine is doing while it starts
    op: str = "status"


@dataclass(frozen=True)
class ReadyEvent:
    pid: int
    model: str
    vllm_version: str
    device: str  # "cpu" or "cuda"
    max_model_len: int
    lora: bool  # adapters can be served
    version: int  # the weights version it serves
    start_s: float  # from process start to ready
    op: str = "ready"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    id: int
    prompts: list[list[int]]  # token ids
    sampling: dict[str, Any]  # a Sampling
    stream: bool = False  # one prompt, one completion: a GenerateReply per step, the last with done = True
    op: str = "generate"


@dataclass(frozen=True)
class Sample:
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length"


@dataclass(frozen=True)
class GenerateReply:
    id: int
    samples: list[list[dict[str, Any]]] = field(default_factory=list)  # per prompt, n Samples
    version: int = 0  # the weights version that generated them
    done: bool = True  # streaming: False until the last reply
    error: str | None = None
    op: str = "generated"


@dataclass(frozen=True)
class ScoreRequest:
    id: int
    prompts: list[list[int]]  # token ids: context + continuation, already cut to the engine's max_model_len - 1
    continuation_lengths: list[int]  # the last this many tokens of each prompt are scored
    op: str = "score"


@dataclass(frozen=True)
class ScoreReply:
    id: int
    logprobs: list[float] = field(default_factory=list)  # per prompt: the continuation's summed log p
    greedy: list[bool] = field(default_factory=list)  # per prompt: every continuation token was rank 1
    version: int = 0  # the weights version that scored them
    error: str | None = None
    op: str = "scored"


@dataclass(frozen=True)
class LoadWeightsRequest:
    id: int
    version: int
    path: str | None = None  # a safetensors file of full (or a subset of) weights, by HF parameter name
    buckets: list[dict[str, Any]] = field(default_factory=list)  # CUDA: {"handle": pickled IPC handle, "tensors"}
    adapter_path: str | None = None  # a PEFT adapter folder
    op: str = "load_weights"


@dataclass(frozen=True)
class LoadWeightsReply:
    id: int
    version: int  # the version it serves now
    seconds: float = 0.0
    error: str | None = None
    op: str = "loaded"


@dataclass(frozen=True)
class PingRequest:
    id: int
    op: str = "ping"


@dataclass(frozen=True)
class PingReply:
    id: int
    version: int
    pid: int
    op: str = "pong"


@dataclass(frozen=True)
class ShutdownRequest:
    id: int = 0
    op: str = "shutdown"


MESSAGES: dict[str, type] = {cls.op: cls for cls in (
    StatusEvent, ReadyEvent, GenerateRequest, GenerateReply, ScoreRequest, ScoreReply, LoadWeightsRequest,
    LoadWeightsReply, PingRequest, PingReply, ShutdownRequest)}


def pack(message: Any) -> bytes:
    import msgpack

    return bytes(msgpack.packb(asdict(message)))


def unpack(data: bytes) -> Any:
    import msgpack

    record = msgpack.unpackb(data)
    cls = MESSAGES.get(str(record.get("op"))) if isinstance(record, dict) else None
    if cls is None:
        raise ValueError(f"unknown message: {str(record)[:200]}")
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in record.items() if k in names})


# ------------------------------------------------------------------------------------- worker extension


class Reloader:
    """Mixed into vLLM's worker (``worker_extension_cls``): in-place weight reloads from a file or CUDA IPC."""

    def swiftk_reload_file(self, path: str) -> int:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            names = list(f.keys())
            weights = ((name, f.get_tensor(name)) for name in names)
            self.model_runner.reload_weights(weights_iterator=weights)  # type: ignore[attr-defined]
        self._refresh_tied_head()
        return len(names)

    def _refresh_tied_head(self) -> None:
        """A tied LM head shares the embedding's weight, but on CPU vLLM packs it for its GEMM when it loads; a reload
        refreshes only the layers it loads (the embedding), so the head is packed again from the new weight."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        head = getattr(model, "lm_head", None)
        head = getattr(head, "base_layer", head)  # under LoRA
        method = getattr(head, "quant_method", None)
        if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and method is not None:
            method.process_weights_after_loading(head)

    def swiftk_reload_ipc(self, buckets: list[dict[str, Any]]) -> int:
        import pickle

        import torch

        def weights() -> Iterator[tuple[str, Any]]:
            device = torch.device("cuda", torch.cuda.current_device())
            for bucket in buckets:
                rebuild, args = pickle.loads(bucket["handle"])
                args = list(args)
                args[6] = device.index  # the handle names the client's device index; map it to ours
                flat = rebuild(*args)  # [bytes] uint8 view of the client's bucket
                for name, dtype, shape, offset, nbytes in bucket["tensors"]:
                    yield name, flat[offset : offset + nbytes].view(getattr(torch, dtype)).view(shape)

        count = sum(len(b["tensors"]) for b in buckets)
        self.model_runner.reload_weights(weights_iterator=weights())  # type: ignore[attr-defined]
        self._refresh_tied_head()
        torch.cuda.synchronize()
        return count


# ------------------------------------------------------------------------------------------------ engine


class Engine:
    def __init__(self, config: dict[str, Any], status: Any) -> None:
        status("importing vllm")
        import vllm

        self.vllm = vllm
        args = dict(config["engine_args"])
        self.lora = bool(args.get("enable_lora"))
        status(f"loading {config['model']} (vllm {vllm.__version__})")
        self.llm = vllm.LLM(model=config["model"], worker_extension_cls="vllm_engine.Reloader", **args)
        self.version = 0
        self.adapter: Any = None  # the LoRARequest served, if any
        self.adapter_head = False  # it adapts lm_head
        import torch

        self.cuda = torch.cuda.is_available()
        self.model = config["model"]

    def ready(self, started: float) -> ReadyEvent:
        max_len = self.llm.llm_engine.model_config.max_model_len
        return ReadyEvent(os.getpid(), self.model, self.vllm.__version__, "cuda" if self.cuda else "cpu", max_len,
                          self.lora, self.version, time.monotonic() - started)

    def params(self, raw: dict[str, Any], stream: bool = False) -> Any:
        s = Sampling(**raw)
        kind = self.vllm.sampling_params.RequestOutputKind
        return self.vllm.SamplingParams(
            n=s.n, max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or -1,
            seed=s.seed, stop=s.stop or None, stop_token_ids=s.stop_token_ids or None,
            logprobs=0 if s.logprobs else None, output_kind=kind.DELTA if stream else kind.FINAL_ONLY)

    def generate(self, request: GenerateRequest) -> GenerateReply:
        prompts = [{"prompt_token_ids": ids} for ids in request.prompts]
        outputs = self.llm.generate(prompts, self.params(request.sampling), use_tqdm=False, lora_request=self.adapter)
        samples = [[asdict(sample(c)) for c in out.outputs] for out in outputs]
        return GenerateReply(request.id, samples, self.version)

    def score(self, request: ScoreRequest) -> ScoreReply:
        """One greedy token per prompt, for the prompt logprobs: position t holds {token: Logprob} with the actual
        token t among them, its rank 1 when it was the most likely. vLLM reads no cached prefix for a request with
        prompt logprobs (its KV cache skips the lookup: cached positions would have no logits), so each prompt is
        prefilled whole; it still writes the cache for later generate calls."""
        params = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        prompts = [{"prompt_token_ids": ids} for ids in request.prompts]
        # Under LoRA, vLLM maps the prompt positions' logits to adapters with the per-request map of the sampled rows
        # (vllm issues 16668, 51594): on CPU a batch of several prompts fails on the shapes, so each goes alone; on
        # CUDA an adapter's lm_head delta would be left out of the scores.
        if self.lora and not self.cuda:
            outputs = [out for p in prompts for out in self.llm.generate([p], params, use_tqdm=False,
                                                                           lora_request=self.adapter)]
        elif self.adapter_head and self.cuda:
            raise ValueError("the served adapter targets lm_head, whose delta vLLM leaves out of prompt logprobs "
                             "(vllm issue 51594); score with the hf generator")
        else:
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.adapter)
        logprobs, greedy = [], []
        for out, ids, length in zip(outputs, request.prompts, request.continuation_lengths, strict=True):
            scored = [out.prompt_logprobs[t][ids[t]] for t in range(len(ids) - length, len(ids))]
            logprobs.append(sum(float(s.logprob) for s in scored))
            greedy.append(all(s.rank == 1 for s in scored))
        return ScoreReply(request.id, logprobs, greedy, self.version)

    def stream(self, request: GenerateRequest, send: Any) -> None:
        engine = self.llm.llm_engine
        rid = f"stream-{request.id}"
        engine.add_request(rid, {"prompt_token_ids": request.prompts[0]}, self.params(request.sampling, True),
                           lora_request=self.adapter)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != rid or not out.outputs:
                    continue
                done = bool(out.finished)
                send(GenerateReply(request.id, [[asdict(sample(out.outputs[0]))]], self.version, done=done))
                if done:
                    return

    def load_weights(self, request: LoadWeightsRequest) -> LoadWeightsReply:
        started = time.perf_counter()
        if request.path:
            self.llm.collective_rpc("swiftk_reload_file", args=(request.path,))
        if request.buckets:
            self.llm.collective_rpc("swiftk_reload_ipc", args=(request.buckets,))
        if request.adapter_path:
            if not self.lora:
                raise ValueError("an adapter was sent to an engine started without enable_lora")
            from vllm.lora.request import LoRARequest

            adapter = LoRARequest(f"v{request.version}", max(1, request.version), request.adapter_path,
                                  load_inplace=True)
            self.llm.llm_engine.add_lora(adapter)  # load it now: a bad adapter fails this sync, not a later request
            if self.adapter is not None and self.adapter.lora_int_id != adapter.lora_int_id:
                self.llm.llm_engine.remove_lora(self.adapter.lora_int_id)
            self.adapter = adapter
            with open(os.path.join(request.adapter_path, "adapter_config.json")) as f:
                self.adapter_head = "lm_head" in str(json.load(f).get("target_modules"))  # a list or a regex
        self.llm.reset_prefix_cache()  # cached prompt KV belongs to the old weights
        self.version = request.version
        return LoadWeightsReply(request.id, self.version, time.perf_counter() - started)


def sample(c: Any) -> Sample:
    logprobs = None
    if c.logprobs is not None:  # one {token id: Logprob} per step; the chosen token is always there
        logprobs = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs, strict=False)]
    return Sample(list(c.token_ids), logprobs, "length" if c.finish_reason == "length" else "stop")


def serve(endpoint: str, config: dict[str, Any]) -> None:
    import zmq

    started = time.monotonic()
    parent = os.getppid()
    socket = zmq.Context().socket(zmq.PAIR)
    socket.setsockopt(zmq.LINGER, 1000)
    socket.connect(endpoint)

    def send(message: Any) -> None:
        socket.send(pack(message))

    engine = Engine(config, lambda text: send(StatusEvent(text)))
    send(engine.ready(started))
    while True:
        if not socket.poll(1000):
            if os.getppid() != parent:  # the client is gone: nobody will ask again
                return
            continue
        request = unpack(socket.recv())
        if isinstance(request, ShutdownRequest):
            return
        if isinstance(request, PingRequest):
            send(PingReply(request.id, engine.version, os.getpid()))
            continue
        try:
            if isinstance(request, GenerateRequest) and request.stream:
                engine.stream(request, send)
            elif isinstance(request, GenerateRequest):
                send(engine.generate(request))
            elif isinstance(request, ScoreRequest):
                send(engine.score(request))
            elif isinstance(request, LoadWeightsRequest):
                send(engine.load_weights(request))
        except Exception as exc:  # this request failed; the engine serves the next one
            error = f"{type(exc).__name__}: {exc}"
            print(f"swiftk engine: {request.op} failed: {error}", file=sys.stderr, flush=True)
            if isinstance(request, LoadWeightsRequest):
                send(LoadWeightsReply(request.id, engine.version, error=error))
            elif isinstance(request, ScoreRequest):
                send(ScoreReply(request.id, version=engine.version, error=error))
            else:
                send(GenerateReply(request.id, version=engine.version, error=error))


def _die_with_parent() -> None:
    """When the client's process ends (even killed, even mid-start), this process group ends too: vLLM's engine-core
    and worker children included, which outlive a killed parent otherwise. A thread watches the parent (the main
    thread may be deep in vLLM's start); on Linux the kernel also sends SIGTERM at once (PR_SET_PDEATHSIG)."""
    import signal
    import threading

    parent = os.getppid()

    def end_group(*_: Any) -> None:
        os.killpg(os.getpgrp(), signal.SIGKILL)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        import shutil

        folder = os.path.dirname(os.path.abspath(__file__))  # the client's work folder (weights files in /dev/shm)
        if os.path.basename(folder).startswith("swiftk-vllm-"):
            shutil.rmtree(folder, ignore_errors=True)
        end_group()

    signal.signal(signal.SIGTERM, end_group)
    threading.Thread(target=watch, name="swiftk-parent-watch", daemon=True).start()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


if __name__ == "__main__":  # vLLM's engine core is a child process: the guard keeps it from re-running this
    _die_with_parent()
    # vLLM's worker imports Reloader as vllm_engine.Reloader: the client runs a copy of this file from a folder of
    # its own and puts that folder on PYTHONPATH.
    serve(sys.argv[1], json.loads(sys.argv[2]))
