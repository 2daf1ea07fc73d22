"""Building, caching and loading native plugins: compiler errors with file:line, ABI mismatches named."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from swiftk.kernel.cli import main
from swiftk.native import NativeABIError, NativeBuildError, build, read_info
from swiftk.native.build import build_key
from swiftk.native.load import load_library

BROKEN = """\
#include <swiftk/plugin.h>
SWIFTK_PLUGIN("broken", "loss");
std::map<std::string, double> defaults() { return {}; }
at::Tensor forward(const at::Tensor& x) {
  return x.no_such_method();
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { swiftk::export_info(m); }
"""


def test_a_compile_error_names_the_plugin_file_and_line(tmp_path: Path, capsys) -> None:
    source = tmp_path / "broken.cpp"
    source.write_text(BROKEN)
    with pytest.raises(NativeBuildError) as caught:
        build(source, progress=None)
    message = str(caught.value)
    assert f"native plugin {source} failed to compile" in message
    assert f"{source}:5:" in message and "no_such_method" in message, message
    assert "full compiler output:" in message
    # the command line says the same and exits 1
    assert main(["native", "build", str(source)]) == 1
    assert f"{source}:5:" in capsys.readouterr().err


def patched(library: Path, folder: Path, old: bytes, new: bytes) -> Path:
    data = library.read_bytes()
    assert data.count(old) == 1, old
    copy = folder / library.name
    copy.write_bytes(data.replace(old, new))
    return copy


def other_torch() -> str:
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    other = minor - 1 if len(str(minor - 1)) == len(str(minor)) else minor + 1
    return f"{major}.{other}.0"


def test_a_build_for_another_torch_is_refused_naming_both_versions(adamw, tmp_path: Path, capsys) -> None:
    info = adamw.info
    library = patched(adamw.library, tmp_path, f'"torch": "{info.torch}"'.encode(),
                      f'"torch": "{other_torch()}"'.encode())
    with pytest.raises(NativeABIError) as caught:
        load_library(library)
    message = str(caught.value)
    running = torch.__version__.split("+")[0]
    assert f"built against torch {other_torch()} but this process runs torch {running}" in message
    assert "swiftk native build" in message
    assert main(["native", "info", str(library)]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["torch"] == other_torch() and "not loadable here" in err


def test_a_build_with_the_other_cxx11_abi_is_refused(adamw, tmp_path: Path) -> None:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    library = patched(adamw.library, tmp_path, f'"cxx11_abi": {abi}'.encode(), f'"cxx11_abi": {1 - abi}'.encode())
    with pytest.raises(NativeABIError, match=f"_GLIBCXX_USE_CXX11_ABI={1 - abi} but this torch uses {abi}"):
        load_library(library)


def test_a_library_that_is_not_a_swiftk_plugin_is_refused_before_loading(tmp_path: Path) -> None:
    import _ctypes

    with pytest.raises(NativeABIError, match="is not a swiftk native plugin: it has no info record"):
        load_library(Path(_ctypes.__file__))


def test_builds_are_cached_by_content(adamw, repo: Path, tmp_path: Path) -> None:
    source = repo / "native" / "adamw.cpp"
    start = time.monotonic()
    assert build(source, progress=None) == adamw.library  # the session's build, not a new one
    assert time.monotonic() - start < 5
    assert read_info(adamw.library).name == "native_adamw"
    copy = tmp_path / "adamw.cpp"
    shutil.copy(source, copy)
    assert build_key(copy) == build_key(source)  # the key is the content, not the path
    copy.write_text(source.read_text() + "\n// an edit\n")
    assert build_key(copy) != build_key(source)
