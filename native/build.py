"""Compile a C++ plugin file into a Python extension against this torch, once per source and toolchain.

``build("plugin.cpp")`` returns the path of the built ``.so``. Builds are cached in
``$SWIFTK_NATIVE_CACHE`` (default ``~/.cache/swiftk/native``) under a key made of the source (and the headers
beside it and ours), the torch and Python versions, the compiler and the flags, so a second run, another
checkout or another test reuses the library, and any change to one of them builds a new one beside it.

The compiler is driven by ``torch.utils.cpp_extension`` (ninja): a first build takes 10-30 s on 2 cores, and
a line on stderr says so and how long it has been running. A failed build raises ``NativeBuildError`` with
the compiler's ``file:line:col: error:`` lines first and the full log kept in the cache folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import torch

from swiftk.contracts import CONTRACT_VERSION

INCLUDE = Path(__file__).resolve().parent / "include"  # <swiftk/plugin.h>, <swiftk/adam.h>
BUILD_LOG = "build.log"
# Value-changing contractions off: a*b+c keeps the rounding of torch's own kernels, so a native optimizer
# reproduces torch's results bit for bit instead of drifting by an ulp per step.
BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fvisibility=hidden", "-fopenmp"]


class NativeBuildError(RuntimeError):
    """A native plugin did not compile or link. The message leads with the compiler's own diagnostics."""


def cache_root() -> Path:
    root = os.environ.get("SWIFTK_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "swiftk" / "native"


def cpu_flags() -> list[str]:
    """The widest ``at::vec`` instruction set this CPU runs, as torch's own kernels choose it.

    Without a ``CPU_CAPABILITY_*`` macro an extension's ``at::vec::Vectorized`` falls back to plain arrays,
    so the flags are what make a native kernel vectorised at all.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                "-mavx512dq", "-mfma"]
    if capability == "AVX2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return ["-DCPU_CAPABILITY=DEFAULT"]


def compile_flags() -> list[str]:
    return [*BASE_FLAGS, *cpu_flags(), f"-DSWIFTK_CONTRACT={CONTRACT_VERSION}"]


def compiler_version() -> str:
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"no C++ compiler: `{cxx} --version` failed ({exc}); install g++ (or set CXX) "
                               f"to build native plugins, or use a prebuilt .so") from exc
    return out.stdout.splitlines()[0] if out.stdout else cxx


def build_key(source: Path) -> str:
    """What decides the binary: the source and its local headers, ours, torch, Python, compiler, flags."""
    digest = hashlib.sha256()
    headers = sorted(p for p in source.parent.iterdir() if p.suffix in (".h", ".hpp", ".cuh"))
    for path in [source, *headers, *sorted(INCLUDE.rglob("*.h"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for part in (torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI), sys.version, sysconfig.get_platform(),
                 compiler_version(), " ".join(compile_flags())):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def extension_name(source: Path, key: str) -> str:
    """The Python module name (and PyInit symbol): unique per build, so two builds can live in one process."""
    stem = re.sub(r"\W", "_", source.stem)
    return f"swiftk_native_{stem}_{key}"


def build(source: str | Path, *, cache_dir: Path | None = None, force: bool = False,
          progress: TextIO | None = sys.stderr) -> Path:
    """Compile ``source`` (a .cpp plugin file) unless a build with the same key exists; the ``.so``'s path."""
    source = Path(source).resolve()
    if not source.is_file():
        raise NativeBuildError(f"native plugin source {source} does not exist")
    if source.suffix not in (".cpp", ".cc", ".cxx"):
        raise NativeBuildError(f"native plugin source {source} is not a C++ file (.cpp, .cc or .cxx)")
    key = build_key(source)
    name = extension_name(source, key)
    folder = (cache_dir or cache_root()) / name
    library = folder / f"{name}.so"
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):  # two processes (ranks, tests) building the same plugin build it once
        if library.is_file() and not force:
            return library
        if force:
            library.unlink(missing_ok=True)
        with ticking(f"building native plugin {source.name}", progress):
            compile_extension(source, name, folder)
    if not library.is_file():
        raise NativeBuildError(f"building {source} produced no {library.name} in {folder}")
    return library


# torch's extension builder remembers in-process which sources it built (a failed build included) and then
# skips them, so each build runs in a fresh interpreter; a compiler crash cannot touch the training process.
BUILD_SCRIPT = "import json, sys; from torch.utils.cpp_extension import load; load(**json.loads(sys.argv[1]))"


def compile_extension(source: Path, name: str, folder: Path) -> None:
    """Run torch's extension build (it writes build.ninja into ``folder`` and runs ninja) in a subprocess."""
    if shutil.which("ninja") is None:
        raise NativeBuildError("native plugins are built with ninja, which is not on PATH: pip install ninja")
    arguments = {"name": name, "sources": [str(source)], "extra_cflags": compile_flags(),
                 "extra_include_paths": [str(INCLUDE)], "build_directory": str(folder), "verbose": False,
                 "with_cuda": False}
    done = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, json.dumps(arguments)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        log = done.stdout + done.stderr
        (folder / BUILD_LOG).write_text(log)
        raise NativeBuildError(diagnose(source, log, folder / BUILD_LOG))


DIAGNOSTIC = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?:(?P<col>\d+):)? (?P<kind>(?:fatal )?error): "
                        r"(?P<message>.*)$", re.MULTILINE)


def diagnose(source: Path, log: str, log_path: Path) -> str:
    """The compiler's errors as ``file:line:col: error: message``, the plugin's own file first."""
    errors = [m for m in DIAGNOSTIC.finditer(log)]
    errors.sort(key=lambda m: Path(m["file"]).name != source.name)
    lines = [f"  {m['file']}:{m['line']}{':' + m['col'] if m['col'] else ''}: {m['kind']}: {m['message']}"
             for m in errors[:10]]
    if not lines:  # a link error or a toolchain problem: show the tail of the log
        lines = ["  " + line for line in log.strip().splitlines()[-15:]]
    more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
    return (f"native plugin {source} failed to compile:\n" + "\n".join(lines) + more +
            f"\nfull compiler output: {log_path}")


@contextmanager
def locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def ticking(what: str, out: TextIO | None, every_s: float = 5.0) -> Iterator[None]:
    """Say that a long step started, how long it has run every few seconds, and how long it took."""
    if out is None:
        yield
        return
    start = time.monotonic()
    done = threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            print(f"  ... {what}: {time.monotonic() - start:.0f} s", file=out, flush=True)

    print(f"{what} (first build of this source and toolchain; 10-30 s) ...", file=out, flush=True)
    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    except BaseException:
        done.set()
        raise
    done.set()
    print(f"{what}: done in {time.monotonic() - start:.1f} s", file=out, flush=True)
