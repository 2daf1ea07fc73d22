"""An OpenAI-compatible HTTP server over a ``Generator``: what ``swiftk serve`` runs with an in-process engine.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent
events ending in ``data: [DONE]`` when ``stream`` is set) and ``GET /health``. Errors have OpenAI's shape,
``{"error": {"message", "type", "param", "code"}}``: 400 for a body that is not JSON or has invalid fields, 401 for
a missing or wrong API key (when one is set), 404 for an unknown model, 500 when generation itself fails; the
server goes on serving after each.

The ``hf`` generator is not thread-safe, so one worker thread owns it (``Worker``). Requests queue for it;
non-streaming requests for the same model with the same sampling settings that wait together are answered by
one ``generate`` call, up to ``max_batch`` sequences. Streaming requests are generated one at a time.

A vision-language model (``Service.images``) takes OpenAI's ``image_url`` content parts in chat messages, each
image a ``data:`` URL (the server fetches no web address and reads no file a client names); any other server
refuses non-text parts with a 400 that says the model reads text only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import queue
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from swiftk.contracts import Completion, Generator, Message, SamplingParams
from swiftk.kernel.errors import DataError

# ------------------------------------------------------------------------------------------------ requests


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, metadata...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # not OpenAI's; vLLM's extension
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError("penalties are not supported by this engine; leave it at 0")
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = ""

    def plain(self, images: bool = False) -> Message:
        """The message as the generator takes it: text, or (``images``: the model reads them) text and image parts."""
        content: str | list[dict[str, Any]] = self.content or ""
        if not isinstance(content, str):
            kinds = sorted({str(part.get("type")) for part in content} - {"text", *(["image_url"] if images else [])})
            if kinds:
                what = "send text and image_url parts" if images else "this model reads text only; send text"
                raise ValueError(f"content parts of type {', '.join(kinds)} are not supported: {what}")
            if any(part.get("type") == "image_url" for part in content):
                content = [image_part(part) if part.get("type") == "image_url" else
                           {"type": "text", "text": str(part.get("text", ""))} for part in content]
            else:
                content = "".join(str(part.get("text", "")) for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


def image_part(part: dict[str, Any]) -> dict[str, Any]:
    """An ``image_url`` part whose image travels in the request: a ``data:`` URL, never a web address or a path."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image  # some clients send the URL alone
    if not isinstance(url, str) or not url.startswith("data:"):
        shown = f"{url[:60]!r}" if isinstance(url, str) else type(url).__name__
        raise ValueError(f"image_url: the url is {shown}; send the image itself as a data: URL "
                         f"(data:image/png;base64,...): this server fetches no web address and reads no file")
    return {"type": "image_url", "image_url": {"url": url}}


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, le=0)  # the engine reports the chosen token's log-probability only


class CompletionBody(Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=0)  # the chosen token's log-probability only: 0
    echo: bool = Field(False)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported; the prompt is yours already")
        return value


class APIError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        return JSONResponse({"error": error}, status_code=self.status)


def invalid(exc: ValidationError) -> APIError:
    problems = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "body"
        problems.append(f"{where}: {error['msg']}" + (f" (got {error['input']!r})" if "input" in error
                                                      and not isinstance(error["input"], dict) else ""))
    param = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
    return APIError(400, "invalid request: " + "; ".join(problems), param=param)


# --------------------------------------------------------------------------------------------- the worker


@dataclass
class Job:
    """One request's prompts, answered by the worker through ``post`` (thread-safe)."""

    model: str
    prompts: list[Any]  # raw text, or chats (lists of messages)
    sampling: SamplingParams
    stream: bool
    # ("done", completions, prompt_tokens) | ("usage", prompt_tokens) | ("piece", i, text) | ("end", i, reason,
    # tokens) | ("error", APIError)
    post: Callable[[tuple[Any, ...]], object]
    cancelled: bool = False

    @property
    def key(self) -> tuple[Any, ...] | None:
        """Jobs with equal keys may share a generate call; None: this one runs alone (a seeded sample is the same
        sample only when its batch is the same)."""
        if self.stream or (self.sampling.seed is not None and not self.sampling.greedy):
            return None
        return self.model, self.sampling, isinstance(self.prompts[0], str)

    @property
    def size(self) -> int:
        return len(self.prompts) * self.sampling.n


@dataclass
class Worker:
    """The one thread that calls the generator. ``models`` maps each served name to the context it generates in
    (a LoRA run's base name: the adapter turned off)."""

    generator: Generator
    tokenizer: Any
    models: dict[str, Callable[[], AbstractContextManager[Any]]]
    system_prompt: str | None = None
    max_batch: int = 8
    batch_wait_s: float = 0.02  # how long a request waits for others to share its generate call
    jobs: queue.Queue[Job | None] = field(default_factory=queue.Queue)
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "generate_calls": 0, "failures": 0})

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="swiftk-serve-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def run(self) -> None:
        pending: deque[Job] = deque()  # taken from the queue, not answered yet (another model or sampling)
        stopping = False
        while pending or not stopping:
            job = pending.popleft() if pending else self.jobs.get()
            if job is None:
                return
            self.stats["requests"] += 1
            if job.stream:
                self.stream(job)
                continue
            time.sleep(self.batch_wait_s)
            while not stopping:
                try:
                    waiting = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stopping = True
                else:
                    pending.append(waiting)
            batch, size = [job], job.size
            for other in list(pending):
                if job.key is not None and other.key == job.key and size + other.size <= self.max_batch:
                    batch.append(other)
                    size += other.size
                    pending.remove(other)
                    self.stats["requests"] += 1
            self.generate(batch)

    def prompt_tokens(self, job: Job) -> int:
        """The prompt tokens of ``job`` (rendered as the generator will render them); a template that rejects
        the chat, or an image that cannot be read, is the client's error."""
        total = 0
        for prompt in job.prompts:
            if isinstance(prompt, str):
                total += len(self.tokenizer(prompt)["input_ids"])
                continue
            try:
                total += self.chat_tokens(prompt)
            except DataError as exc:  # an image that does not decode, an image placeholder written in the text
                raise APIError(400, str(exc), param="messages") from None
            except Exception as exc:
                raise APIError(400, f"the model's chat template rejects these messages: {exc}",
                               param="messages") from None
        return total

    def chat_tokens(self, chat: list[Message]) -> int:
        measure = getattr(self.generator, "prompt_length", None)  # a generator that reads images counts their tokens
        if measure is not None:
            return int(measure(chat))
        from swiftk.plugins.generators.hf import render_prompt

        text = render_prompt(self.tokenizer, chat, self.system_prompt)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, batch: list[Job]) -> None:
        ready, counts = [], []
        for job in batch:
            try:
                counts.append(self.prompt_tokens(job))
                ready.append(job)
            except APIError as exc:
                job.post(("error", exc))
        if not ready:
            return
        prompts = [p for job in ready for p in job.prompts]
        self.stats["generate_calls"] += 1
        try:
            with self.models[ready[0].model]():
                completions = self.generator.generate(prompts, ready[0].sampling)
        except Exception as exc:
            self.stats["failures"] += 1
            for job in ready:
                job.post(("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")))
            return
        start = 0  # completions come grouped in prompt order, n per prompt
        for job, count in zip(ready, counts, strict=True):
            mine = completions[start * job.sampling.n : (start + len(job.prompts)) * job.sampling.n]
            job.post(("done", [dataclasses.replace(c, prompt_index=c.prompt_index - start) for c in mine], count))
            start += len(job.prompts)

    def stream(self, job: Job) -> None:
        try:
            job.post(("usage", self.prompt_tokens(job)))
            with self.models[job.model]():
                for index, prompt in enumerate(p for p in job.prompts for _ in range(job.sampling.n)):
                    text = ""
                    for piece in self.pieces(prompt, job.sampling):
                        text += piece
                        if not job.cancelled:  # a client gone: generate to the end anyway, the engine is shared
                            job.post(("piece", index, piece))
                    tokens = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                    reason = "length" if tokens >= job.sampling.max_new_tokens else "stop"
                    job.post(("end", index, reason, tokens))
            job.post(("done", None, 0))
        except APIError as exc:
            job.post(("error", exc))
        except Exception as exc:
            self.stats["failures"] += 1
            job.post(("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")))

    def pieces(self, prompt: Any, sampling: SamplingParams) -> Iterator[str]:
        """The answer's text as it is generated (the whole answer at once where the engine cannot stream)."""
        single = dataclasses.replace(sampling, n=1)
        stream = getattr(self.generator, "stream", None)
        if stream is not None:
            yield from stream(prompt, single)
        else:
            yield self.generator.generate([prompt], single)[0].text


# ------------------------------------------------------------------------------------------------- the app


@dataclass
class Service:
    """What the app serves and how."""

    worker: Worker
    defaults: Any  # a GenerationConfig: the sampling defaults a request may override
    api_key: str | None = None
    images: bool = False  # the model reads images: chat messages may hold image_url parts
    created: int = field(default_factory=lambda: int(time.time()))

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        token = bearer(request)
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            what = "no API key was given" if not token else "the API key is wrong"
            raise APIError(401, f"{what}: send 'Authorization: Bearer KEY' with the key the server was started "
                                f"with (--api-key or $SWIFTK_API_KEY)", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name not in self.worker.models:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(m) for m in self.worker.models)}", param="model",
                           code="model_not_found")

    def sampling(self, body: Body, max_tokens: int | None, logprobs: bool) -> SamplingParams:
        """The [generation] defaults with what the request sets."""
        stop = body.stops() if body.stop is not None else None
        try:
            sampling: SamplingParams = self.defaults.sampling(
                max_new_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                seed=body.seed, stop=stop, n=body.n, logprobs=logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return sampling


async def parse(request: Request, model: type[Body]) -> Any:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None


def submit(service: Service, model: str, prompts: list[Any], sampling: SamplingParams,
           stream: bool) -> tuple[Job, asyncio.Queue[tuple[Any, ...]]]:
    loop = asyncio.get_running_loop()
    replies: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    job = Job(model, prompts, sampling, stream, lambda item: loop.call_soon_threadsafe(replies.put_nowait, item))
    service.worker.jobs.put(job)
    return job, replies


async def answer(service: Service, model: str, prompts: list[Any],
                 sampling: SamplingParams) -> tuple[list[Completion], int]:
    _, replies = submit(service, model, prompts, sampling, stream=False)
    kind, *rest = await replies.get()
    if kind == "error":
        raise rest[0]
    return rest[0], rest[1]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(service: Service) -> Starlette:
    """The ASGI app; its lifespan starts and stops the worker thread."""

    async def models(request: Request) -> Response:
        service.check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": service.created, "owned_by": "swiftk"}
            for name in service.worker.models]})

    async def model(request: Request) -> Response:
        service.check_key(request)
        name = request.path_params["name"]
        service.check_model(name)
        return JSONResponse({"id": name, "object": "model", "created": service.created, "owned_by": "swiftk"})

    async def chat(request: Request) -> Response:
        service.check_key(request)
        body: ChatBody = await parse(request, ChatBody)
        service.check_model(body.model)
        try:
            messages = [m.plain(service.images) for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        sampling = service.sampling(body, body.max_completion_tokens or body.max_tokens, body.logprobs)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(stream_chat(service, body, messages, sampling, ident, created))
        completions, prompt_tokens = await answer(service, body.model, [messages], sampling)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(service, c) if body.logprobs else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(completions)]
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": body.model,
                             "choices": choices,
                             "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in completions))})

    async def complete(request: Request) -> Response:
        service.check_key(request)
        body: CompletionBody = await parse(request, CompletionBody)
        service.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt: give at least one prompt", param="prompt")
        sampling = service.sampling(body, body.max_tokens, body.logprobs is not None)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            return sse(stream_completion(service, body, prompts, sampling, ident, created))
        completions, prompt_tokens = await answer(service, body.model, prompts, sampling)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                    "logprobs": completion_logprobs(service, c) if body.logprobs is not None else None}
                   for i, c in enumerate(completions)]
        return JSONResponse({"id": ident, "object": "text_completion", "created": created, "model": body.model,
                             "choices": choices,
                             "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in completions))})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", **service.worker.stats})

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = {404: f"no route {request.url.path}; this server has /v1/models, /v1/chat/completions, "
                        f"/v1/completions and /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return APIError(exc.status_code, message).response()

    async def server_error(request: Request, exc: Exception) -> Response:
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.worker.start()
        yield
        await asyncio.to_thread(service.worker.stop)

    routes = [Route("/v1/models", models), Route("/v1/models/{name:path}", model),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", complete, methods=["POST"]), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        APIError: api_error, HTTPException: http_error, Exception: server_error})


# ------------------------------------------------------------------------------------------------ streaming


def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def events(service: Service, model: str, prompts: list[Any],
                 sampling: SamplingParams) -> AsyncIterator[tuple[Any, ...]]:
    """The worker's replies for a streaming request; marks the job cancelled if the client goes away."""
    job, replies = submit(service, model, prompts, sampling, stream=True)
    try:
        while True:
            item = await replies.get()
            if item[0] == "done":
                return
            yield item
            if item[0] == "error":
                return
    finally:
        job.cancelled = True


def error_event(item: tuple[Any, ...]) -> dict[str, Any]:
    exc: APIError = item[1]
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}


async def stream_chat(service: Service, body: ChatBody, messages: list[Message], sampling: SamplingParams,
                      ident: str, created: int) -> AsyncIterator[dict[str, Any]]:
    def chunk(index: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    prompt_tokens = completion_tokens = 0
    started: set[int] = set()
    async for item in events(service, body.model, [messages], sampling):
        if item[0] == "usage":
            prompt_tokens = item[1]
        elif item[0] == "error":
            yield error_event(item)
        elif item[0] == "piece":
            if item[1] not in started:
                started.add(item[1])
                yield chunk(item[1], {"role": "assistant", "content": ""})
            yield chunk(item[1], {"content": item[2]})
        elif item[0] == "end":
            if item[1] not in started:
                yield chunk(item[1], {"role": "assistant", "content": ""})
            completion_tokens += item[3]
            yield chunk(item[1], {}, item[2])
    if (body.stream_options or {}).get("include_usage"):
        yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": body.model,
               "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


async def stream_completion(service: Service, body: CompletionBody, prompts: list[str], sampling: SamplingParams,
                            ident: str, created: int) -> AsyncIterator[dict[str, Any]]:
    def chunk(index: int, text: str, reason: str | None = None) -> dict[str, Any]:
        return {"id": ident, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}

    prompt_tokens = completion_tokens = 0
    async for item in events(service, body.model, prompts, sampling):
        if item[0] == "usage":
            prompt_tokens = item[1]
        elif item[0] == "error":
            yield error_event(item)
        elif item[0] == "piece":
            yield chunk(item[1], item[2])
        elif item[0] == "end":
            completion_tokens += item[3]
            yield chunk(item[1], "", item[2])
    if (body.stream_options or {}).get("include_usage"):
        yield {"id": ident, "object": "text_completion", "created": created, "model": body.model, "choices": [],
               "usage": usage(prompt_tokens, completion_tokens)}


# ------------------------------------------------------------------------------------------------- logprobs


def token_texts(service: Service, completion: Completion) -> list[str]:
    return [str(service.worker.tokenizer.decode([t])) for t in completion.token_ids]


def chat_logprobs(service: Service, completion: Completion) -> dict[str, Any]:
    pairs = zip(token_texts(service, completion), completion.logprobs or [], strict=False)
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []} for t, lp in pairs]}


def completion_logprobs(service: Service, completion: Completion) -> dict[str, Any]:
    tokens = token_texts(service, completion)
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": completion.logprobs or [], "top_logprobs": None,
            "text_offset": offsets}


# -------------------------------------------------------------------------------------------------- serving


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port`` (port 0: a free one), bound before the model loads so that a
    port in use is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run(app: Starlette, sock: socket.socket, on_ready: Callable[[], None], log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until SIGINT/SIGTERM; ``on_ready`` is called once it accepts connections."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # stop serving and return (uvicorn re-raises the signal)
            self.force_exit = self.should_exit and sig == signal.SIGINT  # a second Ctrl-C: stop now
            self.should_exit = True

    server = Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            on_ready()
        await task

    asyncio.run(serve())


def bearer(request: Request) -> str:
    """The token of the request's ``Authorization: Bearer TOKEN`` header ('' when it has none)."""
    given = request.headers.get("authorization", "")
    return given[7:].strip() if given.lower().startswith("bearer ") else ""


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
