"""``swiftk serve RUN|MODEL``: an OpenAI-compatible HTTP server over a finished run or a model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from contextlib import nullcontext
from typing import Any

from swiftk.kernel.cli.run import quiet_libraries
from swiftk.kernel.served import add_target_arguments

DESCRIPTION = textwrap.dedent("""\
    Serve a finished run or a model over OpenAI's API: /v1/models, /v1/chat/completions, /v1/completions
    (streamed as server-sent events with "stream": true) and /health. Any OpenAI client works: point its base
    URL at http://HOST:PORT/v1.

    RUN|MODEL as for `swiftk infer`. Model names: --model-name NAME (default: the run directory's name, or the
    model folder's / GGUF file's / hub id's last part) is the trained model; for a LoRA run that is the adapter
    on its base, and the base alone is served too, as NAME-base (not with --merged).

    --engine hf (default, unless the run's [generation] engine says otherwise) generates in this process;
    concurrent requests with the same sampling settings share one generate call (up to [generation]
    max_concurrency). --engine vllm runs vLLM's own OpenAI server from its managed environment (`swiftk env
    install vllm`; a LoRA run's adapter is served under NAME, its base as NAME-base).

    Images: a vision-language model (a `[train] stage = "vlm"` run, or a model folder whose config has a vision
    part: LLaVA, Idefics3...) takes OpenAI's image_url content parts in chat messages, each image sent as a
    data: URL ({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}); the server fetches no
    web address and reads no file a client names. Streaming works with images too. Such a model is served with
    --engine hf only. A text model answers a request with image parts with a 400 error.

    Security: the server binds 127.0.0.1 unless --host says otherwise, and any other address needs an API key
    (--api-key KEY or $SWIFTK_API_KEY); clients then send 'Authorization: Bearer KEY'.

    exit codes: 0 stopped, 1 a model error, 2 bad arguments, an unknown RUN|MODEL, a port in use, or a
    non-local bind without an API key; with vllm, the vLLM server's own exit code.""")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_target_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api-key", default=None, metavar="KEY", help="require this key (default: $SWIFTK_API_KEY)")
    parser.add_argument("--model-name", default=None, metavar="NAME", help="the name clients ask for (see above)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                        help="the HTTP server's log level (info: one line per request)")


def main(args: argparse.Namespace) -> int:
    quiet_libraries()  # before anything imports peft (and so bitsandbytes, which talks on import)
    from swiftk.kernel.served import UsageError, resolve
    from swiftk.kernel.serving import loopback

    key = args.api_key or os.environ.get("SWIFTK_API_KEY") or None
    if not loopback(args.host) and not key:
        raise UsageError(f"refusing to serve on --host {args.host} without an API key: anyone who can reach this "
                         f"machine could use the model. Pass --api-key KEY (or set SWIFTK_API_KEY), or bind "
                         f"127.0.0.1.")
    target = resolve(args.target, args.gguf_file)
    generation = target.generation_with(args.engine)
    engine = generation.engine
    name = args.model_name or target.name
    if engine == "vllm":
        return serve_vllm(target, generation, name, args.host, args.port, key)
    from swiftk.kernel import serving
    from swiftk.kernel.served import load, make_generator

    try:
        sock = serving.bind(args.host, args.port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}. Choose another --port "
                         f"(0: any free one).") from None
    loaded = load(target, merged=args.merged)
    generator = make_generator(target, loaded, generation, target.system_prompt,
                               report=lambda line: print(line, file=sys.stderr))
    models: dict[str, Any] = {name: nullcontext}
    if loaded.adapter:
        models[f"{name}-base"] = loaded.base
    worker = serving.Worker(generator, loaded.tokenizer, models, target.system_prompt,
                            max_batch=generation.max_concurrency)
    service = serving.Service(worker, generation, key, images=loaded.processor is not None)
    host, port = sock.getsockname()[:2]
    try:
        serving.run(serving.create_app(service), sock,
                    lambda: ready(target.describe(), engine, list(models), host, port, key is not None),
                    log_level=args.log_level)
    finally:
        generator.close()
    return 0


def ready(what: str, engine: str, models: list[str], host: str, port: int, keyed: bool) -> None:
    """The lines that say the server answers, and how to ask it something."""
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    auth = " -H \"Authorization: Bearer $SWIFTK_API_KEY\"" if keyed else ""
    body = json.dumps({"model": models[0], "messages": [{"role": "user", "content": "Hello!"}]})
    print(f"swiftk serve: {what} · {engine} engine · models {', '.join(models)} · ready at {url}", flush=True)
    print(f"  curl {url}/chat/completions -H \"Content-Type: application/json\"{auth} -d '{body}'", flush=True)


def serve_vllm(target: Any, generation: Any, name: str, host: str, port: int, key: str | None) -> int:
    """vLLM's own server over the target's weights (see kernel/vllm_server.py)."""
    import tempfile
    from pathlib import Path

    import torch

    from swiftk.kernel import engine_files, envs, vllm_server
    from swiftk.kernel.model import resolve_source
    from swiftk.kernel.served import UsageError, load_tokenizer_only, quiet

    if target.cfg is not None and target.cfg.model.init == "random" and target.adapter_dir is not None:
        raise UsageError(f"--engine vllm: {target.spec}'s base model is a random init ([model] init = 'random'), "
                         f"which vLLM cannot load from a folder; merge it first (`swiftk export {target.spec} --merge "
                         f"--out DIR`) and serve DIR, or use --engine hf.")
    if not torch.cuda.is_available() and target.adapter_dir is None and target.run_dir is None:
        refusal = engine_files.vllm_cpu_refusal(Path(resolve_source(target.model_cfg.model_id)))
        if refusal:
            raise UsageError(f"--engine vllm: {refusal}.")
    port = free_port(host, port)
    python = envs.ensure("vllm", env_dir=generation.env_dir, progress=True)
    with quiet():
        tokenizer = load_tokenizer_only(target)
        model_dir = engine_files.model_folder(target.model_cfg, tokenizer)
    work = Path(tempfile.mkdtemp(prefix="swiftk-serve-vllm-"))
    template = None
    if target.system_prompt and tokenizer.chat_template:
        template = vllm_server.chat_template_with_system(tokenizer.chat_template, target.system_prompt, work)
    cmd = vllm_server.command(python, model_dir, name, host, port, generation, adapter_dir=target.adapter_dir,
                              lora_rank=target.lora_rank, chat_template=template, cuda=torch.cuda.is_available())
    models = [name, f"{name}-base"] if target.adapter_dir is not None else [name]
    return vllm_server.supervise(cmd, vllm_server.environment(key), host, port, generation.start_timeout_s,
                                 lambda: ready(target.describe(), "vllm", models, host, port, key is not None),
                                 log_dir=work)


def free_port(host: str, port: int) -> int:
    """``port`` if it is free (0: a free one), for a server that binds it itself."""
    from swiftk.kernel import serving
    from swiftk.kernel.served import UsageError

    try:
        sock = serving.bind(host, port)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}. Choose another --port.") from None
    port = sock.getsockname()[1]
    sock.close()
    return int(port)
