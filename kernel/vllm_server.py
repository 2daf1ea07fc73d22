"""``swiftk serve --engine vllm``: vLLM's own OpenAI-compatible server, run from its managed environment and
supervised (signals forwarded, readiness awaited, a failed start reported with its last log lines).

The base weights are an HF folder (``engine_files.model_folder``: a GGUF source is converted once and cached); a
LoRA run's ``final/`` is served as a named adapter (``--lora-modules NAME=final``) beside its base (``NAME-base``),
as ``swiftk serve --engine hf`` names them. A run's [data] system_prompt is baked into the chat template given to
vLLM, since its server has no such option. The API key travels in the environment, never on a command line
other users of the machine can read.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from swiftk.kernel.config import GenerationConfig
from swiftk.kernel.errors import SwiftkError

LAST_LINES = 40
ERROR_LINE = re.compile(r"\b\w+(Error|Exception): ")  # where a traceback says what went wrong


class VLLMServerError(SwiftkError):
    """vLLM's server could not be started, or stopped before it was ready."""


def command(python: str | Path, model_dir: str | Path, name: str, host: str, port: int,
            generation: GenerationConfig, *, adapter_dir: Path | None = None, lora_rank: int = 0,
            chat_template: Path | None = None, cuda: bool = False) -> list[str]:
    """The vLLM server's command line."""
    served = f"{name}-base" if adapter_dir is not None else name
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", served, "--host", host, "--port", str(port),
           "--max-num-seqs", str(generation.max_concurrency), "--generation-config", "vllm",
           "--override-generation-config", json.dumps(sampling_defaults(generation))]
    if generation.seed is not None:
        cmd += ["--seed", str(generation.seed)]
    if generation.max_model_len is not None:
        cmd += ["--max-model-len", str(generation.max_model_len)]
    if cuda:
        cmd += ["--gpu-memory-utilization", str(generation.gpu_memory_utilization)]
    else:  # on CPU vLLM would reserve that share of the machine's memory: a KV cache of a fixed size instead
        cmd += ["--kv-cache-memory-bytes", str(int(generation.kv_cache_gb * 2**30))]
    if adapter_dir is not None:
        from swiftk.plugins.generators.vllm import max_lora_rank

        cmd += ["--enable-lora", "--lora-modules", f"{name}={adapter_dir}", "--max-lora-rank",
                str(max_lora_rank(lora_rank))]
    if chat_template is not None:
        cmd += ["--chat-template", str(chat_template)]
    for key, value in generation.engine_args.items():  # vllm.LLM arguments are the server's flags too
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False and value is not None:
            cmd += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return cmd


def sampling_defaults(generation: GenerationConfig) -> dict[str, Any]:
    """[generation]'s sampling defaults as vLLM's generation-config keys (a request may override each)."""
    return {"temperature": generation.temperature, "top_p": generation.top_p, "top_k": generation.top_k or -1,
            "max_new_tokens": generation.max_new_tokens}


def chat_template_with_system(template: str, system_prompt: str, folder: Path) -> Path:
    """The tokenizer's chat template, adding ``system_prompt`` to chats that have no system turn (as training
    did), written to ``folder``."""
    head = ("{%- if not (messages and messages[0]['role'] == 'system') -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {json.dumps(system_prompt)}}}] + messages -%}}"
            "{%- endif -%}")
    path = folder / "chat_template.jinja"
    path.write_text(head + template)
    return path


def environment(api_key: str | None) -> dict[str, str]:
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return env


def supervise(cmd: list[str], env: dict[str, str], host: str, port: int, start_timeout_s: float,
              on_ready: Callable[[], None], log_dir: Path | None = None) -> int:
    """Run ``cmd`` until it exits; SIGINT/SIGTERM are passed on to it. ``on_ready`` once ``/health`` answers.
    Returns its exit code; raises ``VLLMServerError`` (with its last log lines) if it stops before it is ready."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="swiftk-serve-vllm-"))
    log_path = log_dir / "vllm-server.log"
    last: deque[str] = deque(maxlen=LAST_LINES)
    errors: list[str] = []  # the first lines that name an exception: the cause, often far above the last lines
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)  # our signals reach it once, from us
    print(f"starting vLLM's server (pid {proc.pid}; its log: {log_path})", file=sys.stderr, flush=True)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        with log_path.open("w") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                last.append(line.rstrip("\n"))
                if len(errors) < 3 and ERROR_LINE.search(line) and line.rstrip("\n") not in errors:
                    errors.append(line.rstrip("\n"))
                if ready.is_set() and ("ERROR" in line or "Traceback" in line):
                    print(line, end="", file=sys.stderr)

    reader = threading.Thread(target=pump, name="swiftk-vllm-log", daemon=True)
    reader.start()
    previous = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        deadline = time.monotonic() + start_timeout_s
        probe = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}/health"
        while not healthy(probe):
            if proc.poll() is not None:
                reader.join(timeout=5)
                raise VLLMServerError(f"vLLM's server exited with code {proc.returncode} before it was ready. Its "
                                      f"last lines ({log_path}):\n" + "\n".join(last) + causes(errors))
            if time.monotonic() > deadline:
                stop(proc)
                reader.join(timeout=5)
                raise VLLMServerError(f"vLLM's server was not ready within {start_timeout_s:g} s ([generation] "
                                      f"start_timeout_s); stopped it. Its last lines ({log_path}):\n"
                                      + "\n".join(last) + causes(errors))
            time.sleep(1)
        ready.set()
        on_ready()
        code = proc.wait()
        reader.join(timeout=5)
        return code if code >= 0 else 128 - code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            stop(proc)


def causes(errors: list[str]) -> str:
    return "\nThe first errors it reported:\n" + "\n".join(errors) if errors else ""


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL of its process group after 30 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass
