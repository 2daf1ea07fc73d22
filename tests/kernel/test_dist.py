"""Many processes on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO reproduce the one-process run with the same global
batch; two "nodes" on one machine; a killed rank; the clear errors. The multi-process tests are slow (each
launch starts 2 Python processes that import torch and transformers on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from swiftk.contracts.events import PluginFailedEvent, of_kind, read, steps
from swiftk.kernel import dist, launch
from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config
from swiftk.kernel.consolidate import consolidate
from swiftk.kernel.errors import ConfigError

from ..conftest import REPO

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="DeepSpeed is not installed (optional extra: "
                                     "DS_BUILD_OPS=0 pip install 'swiftk[deepspeed]')")
STEPS = 10

# The tiny addition model, fp32 (so that ranks and one process agree to rounding), a constant schedule (so that
# max_steps changes nothing), no eval. Global batch 32 = batch_size x processes.
CONFIG = """
[model]
model_id = "data/tiny_tokenizer"
init = "random"
architecture = {{ model_type = "llama", hidden_size = 64, intermediate_size = 128, num_hidden_layers = 2, \
num_attention_heads = 4, num_key_value_heads = 4, max_position_embeddings = 64, tie_word_embeddings = false }}
[data]
train_file = "data/synthetic/addition_train.jsonl"
max_length = 32
[train]
tuner_strategy = "full"
lr = 3e-3
scheduler = "constant"
warmup_steps = 3
batch_size = {batch}
max_steps = {steps}
seed = 0
precision = "fp32"
[output]
dir = "{out}"
save_every = {save_every}
keep_last = 5
[log]
progress = "plain"
[distributed]
{distributed}
"""


def config(path: Path, out: Path, processes: int = 1, steps: int = STEPS, save_every: int = 5, **distributed) -> Path:
    table = {"num_processes": processes, **distributed}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    path.write_text(CONFIG.format(batch=32 // processes, steps=steps, out=out, save_every=save_every,
                                  distributed=lines))
    return path


def swiftk(*args: str, timeout: float = 240, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TORCH_EXTENSIONS_DIR": str(REPO / "build" / "torch_extensions")}  # DeepSpeed's JIT ops, built once
    command = [sys.executable, "-m", "swiftk", "run", *args]
    if not wait:
        return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    records = steps(read(run_dir / "metrics.jsonl"))
    assert len(records) == len({r.step for r in records}), "only rank 0 writes metrics.jsonl, once per step"
    return {r.step: r.loss for r in records}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """The one-process run: batch 32, in this process."""
    os.chdir(REPO)
    tmp = tmp_path_factory.mktemp("single")
    assert main(["run", str(config(tmp / "c.toml", tmp / "run"))]) == 0
    return losses(tmp / "run")


def assert_matches(got: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(got) == sorted(reference)
    for step in got:
        assert got[step] == pytest.approx(reference[step], rel=1e-5), (step, got, reference)


def two_processes(tmp_path: Path, **distributed) -> dict[int, float]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    done = swiftk(str(config(tmp_path / "c.toml", tmp_path / "run", processes=2, **distributed)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / f"run/checkpoints/step-{STEPS:06d}/meta.json").is_file()
    return losses(tmp_path / "run")


@pytest.mark.slow
def test_ddp_two_processes_reproduce_one(reference: dict[int, float], tmp_path: Path) -> None:
    got = two_processes(tmp_path, backend="ddp")
    assert_matches(got, reference)
    assert (tmp_path / "run/final/model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_compiled_blocks_under_ddp_and_fsdp2_reproduce_one_eager_process(reference: dict[int, float], tmp_path: Path,
                                                                           backend: str) -> None:
    path = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend=backend)
    path.write_text(path.read_text().replace("[train]\n", "[train]\ncompile = true\n", 1))
    done = swiftk(str(path), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"compile: 2 x (FSDP)?LlamaDecoderLayer", done.stdout), done.stdout  # FSDP2 renames the class
    assert "compile: failed" not in done.stdout and "compile: off" not in done.stdout, done.stdout
    assert_matches(losses(tmp_path / "run"), reference)


@pytest.mark.slow
def test_fsdp2_two_processes_reproduce_one(reference: dict[int, float], tmp_path: Path) -> None:
    assert_matches(two_processes(tmp_path, backend="fsdp"), reference)
    final = load_file(tmp_path / "run/final/model.safetensors")  # gathered from the shards
    hf = consolidate(tmp_path / f"run/checkpoints/step-{STEPS:06d}", tmp_path / "hf")  # the documented path
    assert all(torch.equal(final[k], v) for k, v in load_file(hf / "model.safetensors").items())


@pytest.mark.slow
@needs_deepspeed
def test_zero2_two_processes_reproduce_one(reference: dict[int, float], tmp_path: Path) -> None:
    assert_matches(two_processes(tmp_path, backend="deepspeed", zero_stage=2), reference)
    assert (tmp_path / f"run/checkpoints/step-{STEPS:06d}/deepspeed").is_dir()


@pytest.mark.slow
@needs_deepspeed
def test_zero3_trains_and_exits_cleanly(reference: dict[int, float], tmp_path: Path) -> None:
    got = two_processes(tmp_path, backend="deepspeed", zero_stage=3)
    assert got[STEPS] < got[1] - 0.5


@pytest.mark.slow
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_a_zero_checkpoint_continues_at_another_world_size_stage_and_engine_and_back(
        stage: int, reference: dict[int, float], tmp_path: Path) -> None:
    """Step 5 of 2 ranks' ZeRO partitions continues exactly: on 4 ranks under the same stage (made whole once by
    DeepSpeed's converter, loaded by its universal loader), under the other stage (a universal folder written in
    that stage's layout from the whole tensors), and in one process (whole tensors by name); and one process's
    step 5 continues under DeepSpeed. A global batch that would change is refused, naming the batch_size."""
    other = 5 - stage
    two_processes(tmp_path / "zero", backend="deepspeed", zero_stage=stage)
    assert main(["run", str(config(tmp_path / "one.toml", tmp_path / "one"))]) == 0
    for source in ("zero/run", "one"):
        shutil.rmtree(tmp_path / source / f"checkpoints/step-{STEPS:06d}")
    zero, alone = "deepspeed checkpoint of 2 processes", "none checkpoint of 1 process"
    for name, source, processes, distributed, said in (
            ("four", "zero/run", 4, {"zero_stage": stage}, f"{zero} as deepspeed (zero_stage {stage}) on 4"),
            ("other", "zero/run", 2, {"zero_stage": other}, f"{zero} as deepspeed (zero_stage {other}) on 2"),
            ("alone", "zero/run", 1, None, f"{zero} as none on 1"),
            ("back", "one", 2, {"zero_stage": stage}, f"{alone} as deepspeed (zero_stage {stage}) on 2"),
            ("bad", "zero/run", 4, {"zero_stage": stage}, "set [train] batch_size = 8")):
        shutil.copytree(tmp_path / source, tmp_path / name)
        options = {"backend": "deepspeed", **distributed} if distributed else {}
        cfg = config(tmp_path / f"{name}.toml", tmp_path / name, processes, **options)
        if name == "bad":  # 4 x 16: twice the global batch
            cfg.write_text(cfg.read_text().replace("batch_size = 8", "batch_size = 16"))
        resumed = swiftk(str(cfg), "--resume")
        out = resumed.stdout + resumed.stderr
        assert said in out, out
        if name == "bad":
            assert resumed.returncode != 0
            assert re.search(r"continue with: swiftk run \S+ --resume$", out, re.MULTILINE), out  # said once
            continue
        assert resumed.returncode == 0, out
        assert_matches(losses(tmp_path / name), reference)
    assert (tmp_path / "four/checkpoints/step-000005/deepspeed-universal").is_dir()  # the converter's
    assert (tmp_path / f"other/checkpoints/step-000005/deepspeed-universal-zero{other}").is_dir()  # written
    assert (tmp_path / f"back/checkpoints/step-000005/deepspeed-universal-zero{stage}").is_dir()


@pytest.mark.slow
def test_two_nodes_on_one_machine_agree_with_one_process(reference: dict[int, float], tmp_path: Path) -> None:
    """Two `swiftk run` invocations, one process each, meeting at a loopback rendezvous."""
    port = launch.free_port("127.0.0.1")
    cfg = config(tmp_path / "c.toml", tmp_path / "run", nnodes=2, master_port=port, join_timeout_s=120)
    cfg.write_text(cfg.read_text().replace("batch_size = 32", "batch_size = 16"))
    nodes = [swiftk(str(cfg), f"--set=distributed.node_rank={rank}", wait=False) for rank in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert_matches(losses(tmp_path / "run"), reference)


@pytest.mark.slow
def test_a_killed_rank_stops_the_others_and_the_last_checkpoint_resumes(tmp_path: Path) -> None:
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, steps=400, save_every=5, timeout_s=60)
    agent = swiftk(str(cfg), wait=False)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (metrics.exists() and len(steps(read(metrics))) >= 7):
        time.sleep(0.05)
    rank1 = next(p for p in psutil.Process(agent.pid).children() if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, _ = agent.communicate(timeout=120)
    assert time.time() - killed_at < 60, "the other rank should stop within the timeout"
    assert agent.returncode == 1 and "rank 1" in out and "SIGKILL" in out, out
    assert "--resume" in out
    before = losses(tmp_path / "run")
    cfg.write_text(cfg.read_text().replace("max_steps = 400", "max_steps = 12"))
    done = swiftk(str(cfg), "--resume")
    assert done.returncode == 0, done.stdout + done.stderr
    after = losses(tmp_path / "run")
    resumed_from = max(s for s in before if s % 5 == 0 and s <= max(before))
    assert max(after) == 12 and resumed_from >= 5
    for step in range(resumed_from + 1, min(max(before), 12) + 1):  # the replayed steps match the first attempt
        assert after[step] == pytest.approx(before[step], rel=1e-6), (step, before, after)


def variant(cfg: Path, lora: bool = False, dpo: bool = False, qlora: bool = False) -> Path:
    """The same run as LoRA or QLoRA (the field's favourite DDP examples) or as DPO on preference pairs."""
    text = cfg.read_text()
    if qlora:
        text = text.replace('tuner_strategy = "full"',
                            'tuner_strategy = "qlora"\nquantization_bit = 4\nlora_rank = 8\nlora_dropout = 0.0')
    if lora:
        # lora_dropout 0: a rank's dropout masks are not the one process's, so the losses would differ
        text = text.replace('tuner_strategy = "full"',
                            'tuner_strategy = "lora"\nlora_rank = 8\nlora_alpha = 16\nlora_dropout = 0.0')
    if dpo:
        text = text.replace("addition_train.jsonl", "addition_pref_train.jsonl")
        text = text.replace("[train]\n", '[train]\nstage = "dpo"\nbeta = 0.1\n')
        text = re.sub(r"batch_size = (\d+)", lambda m: f"batch_size = {int(m[1]) // 2}", text)  # pairs: 2 rows each
    cfg.write_text(text)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "qlora", "dpo"])
def test_lora_qlora_and_dpo_under_ddp_reproduce_one_process(kind: str, tmp_path: Path) -> None:
    options = {kind: True}
    single = variant(config(tmp_path / "one.toml", tmp_path / "one"), **options)
    assert main(["run", str(single)]) == 0
    double = variant(config(tmp_path / "two.toml", tmp_path / "two", processes=2, backend="ddp"), **options)
    done = swiftk(str(double))
    assert done.returncode == 0, done.stdout + done.stderr
    assert_matches(losses(tmp_path / "two"), losses(tmp_path / "one"))
    if kind in ("lora", "qlora"):
        assert (tmp_path / "two/final/adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "qlora", "dpo"])
def test_lora_and_full_dpo_under_fsdp2_reproduce_one_process(kind: str, tmp_path: Path) -> None:
    """FSDP2 shards the model per decoder layer (QLoRA's 4-bit codes too, their scales staying whole); DPO's frozen
    reference (full fine-tuning: a copy of the model) is copied before sharding and sharded like it; a LoRA run's
    --merge rebuilds the base and merges final/. QLoRA's 4-bit weights are dequantized to float32 for each matmul
    (bfloat16 products differ by 1e-5 at step 4 once the gradients are reduced over ranks)."""
    options = {kind: True}
    single = variant(config(tmp_path / "one.toml", tmp_path / "one"), **options)
    double = variant(config(tmp_path / "two.toml", tmp_path / "two", processes=2, backend="fsdp"), **options)
    for path in (single, double):
        path.write_text(path.read_text().replace("quantization_bit = 4", 'quantization_bit = 4\n'
                                                 'bnb_4bit_compute_dtype = "float32"'))
    assert main(["run", str(single), "--merge"]) == 0
    done = swiftk(str(double), "--merge")
    assert done.returncode == 0, done.stdout + done.stderr
    assert_matches(losses(tmp_path / "two"), losses(tmp_path / "one"))
    if kind == "lora":
        one, two = (load_file(tmp_path / run / "merged/model.safetensors") for run in ("one", "two"))
        assert one.keys() == two.keys() and not any("lora" in k for k in two)
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@needs_deepspeed
def test_zero_offload_reproduces_one_process(reference: dict[int, float], tmp_path: Path) -> None:
    """ZeRO-2 with the optimizer state in CPU memory, and ZeRO-3 with parameters offloaded too (a torch optimizer
    steps the offloaded fp32 partitions: no cpu_adam build is needed)."""
    assert_matches(two_processes(tmp_path / "z2", backend="deepspeed", zero_stage=2, offload_optimizer=True),
                   reference)
    assert_matches(two_processes(tmp_path / "z3", backend="deepspeed", zero_stage=3, offload_optimizer=True,
                                 offload_param=True), reference)


NAN_GRAD = """
import torch
import torch.nn.functional as F
from swiftk.contracts import LossResult, hookimpl, register_loss, supervised

@register_loss("nan_grad")
class NanGrad:
    @hookimpl
    def swiftk_loss_compute(self, batch, outputs, step):
        logits, labels = supervised(batch, outputs)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum") / batch.num_items_in_batch
        if step == 2:  # a finite loss whose gradient is NaN: d sqrt(x) / dx at 0 is inf, times 0
            loss = loss + 0.0 * (outputs.logits[..., :1] * 0.0).sqrt().sum()
        return LossResult(loss)
"""


@pytest.mark.slow
@needs_deepspeed
def test_a_non_finite_gradient_under_deepspeed_stops_before_any_bad_update(tmp_path: Path) -> None:
    """DeepSpeed measures the gradient norm inside its step and skips a non-finite one; the run stops there with
    the reason, and the last checkpoint holds finite weights."""
    (tmp_path / "nan_grad.py").write_text(NAN_GRAD)
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, save_every=2, backend="deepspeed", zero_stage=2)
    text = cfg.read_text().replace("[train]\n", '[train]\nloss_type = "nan_grad"\n')
    cfg.write_text(f'plugins = ["{tmp_path / "nan_grad.py"}"]\n' + text)
    done = swiftk(str(cfg))
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "the gradient norm became inf" in out and "the engine skipped the update" in out, out
    assert sorted(losses(tmp_path / "run")) == [1, 2]
    weights = load_file(tmp_path / "run/checkpoints/step-000002/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_ranks_with_another_config_or_plugin_code_are_refused(tmp_path: Path) -> None:
    """Two "nodes" given the same config file, but node 1 adds a --set and imports another version of a plugin
    module (its PYTHONPATH differs): both differences are named, and neither node trains."""
    port = launch.free_port("127.0.0.1")
    cfg = config(tmp_path / "c.toml", tmp_path / "run", nnodes=2, master_port=port, join_timeout_s=120)
    cfg.write_text('plugins = ["swk_rank_plugin"]\n' + cfg.read_text())
    nodes = []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        (folder / "swk_rank_plugin.py").write_text(f"from swiftk.contracts import hookimpl\n\n@hookimpl\n"
                                                   f"def swiftk_step_end(state):\n    return {{'v': {rank}.0}}\n")
        extra = ["--set=train.lr=1e-3"] if rank == 1 else []
        env = {**os.environ, "PYTHONPATH": str(folder), "HF_HUB_OFFLINE": "1"}
        nodes.append(subprocess.Popen([sys.executable, "-m", "swiftk", "run", str(cfg),
                                       f"--set=distributed.node_rank={rank}", *extra],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes), outputs
    assert "runs another config than rank 0" in outputs[0], outputs[0]
    assert "plugin 'module:swk_rank_plugin' has code" in outputs[0], outputs[0]
    assert not (tmp_path / "run/metrics.jsonl").exists() or not steps(read(tmp_path / "run/metrics.jsonl"))


PID_LOG = """
import os
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    with open({log!r}, "a") as log:
        log.write(f"{{os.getpid()}}\\n")
    return {{"host_calls": 1.0}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("shared", ["node", "rank"])
def test_a_host_shared_by_the_ranks_of_a_node(shared: str, tmp_path: Path) -> None:
    """shared = "node": one host process serves both ranks' calls (each rank a session of it); "rank" (the
    default, the control): one host per rank."""
    log = tmp_path / "calls.log"
    (tmp_path / "pid_log.py").write_text(PID_LOG.format(log=str(log)))
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="ddp")
    cfg.write_text(f'[[plugins]]\npath = "{tmp_path / "pid_log.py"}"\nisolation = "process"\nshared = "{shared}"\n\n'
                   + cfg.read_text())
    done = swiftk(str(cfg))
    assert done.returncode == 0, done.stdout + done.stderr
    pids = log.read_text().split()
    assert len(pids) == 2 * STEPS  # every rank's call, every step
    assert len(set(pids)) == (1 if shared == "node" else 2)
    assert len(losses(tmp_path / "run")) == STEPS


@pytest.mark.slow
def test_a_shared_host_that_dies_fails_its_calls_on_every_rank_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "dies.py").write_text("import os\nfrom swiftk.contracts import hookimpl\n\n@hookimpl\n"
                                      "def swiftk_step_end(state, metrics):\n    if state.step == 4:\n"
                                      "        os._exit(3)\n    return {'alive': 1.0}\n")
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="ddp")
    cfg.write_text(f'[[plugins]]\npath = "{tmp_path / "dies.py"}"\nisolation = "process"\nshared = "node"\n'
                   f'on_failure = "skip"\n\n' + cfg.read_text())
    done = swiftk(str(cfg))
    assert done.returncode == 0, done.stdout + done.stderr
    records = read(tmp_path / "run/metrics.jsonl")
    by_step = {r.step: r for r in steps(records)}
    assert sorted(by_step) == list(range(1, STEPS + 1))
    assert [s for s, r in by_step.items() if "alive" in r.metrics] == [1, 2, 3]
    failed = of_kind(records, PluginFailedEvent)
    assert failed and "shared host" in (done.stdout + done.stderr)


@pytest.mark.slow
def test_a_problem_on_one_node_only_stops_every_node_with_its_reason(tmp_path: Path) -> None:
    """Node 1 lacks a plugin module that node 0 has: both nodes stop before training, and node 0's output names
    node 1's problem (it would otherwise wait for node 1 in the next collective)."""
    port = launch.free_port("127.0.0.1")
    cfg = config(tmp_path / "c.toml", tmp_path / "run", nnodes=2, master_port=port, join_timeout_s=120)
    cfg.write_text('plugins = ["swk_node0_plugin"]\n' + cfg.read_text())
    (tmp_path / "node0").mkdir()
    (tmp_path / "node0" / "swk_node0_plugin.py").write_text("from swiftk.contracts import hookimpl\n\n@hookimpl\n"
                                                          "def swiftk_step_end(state):\n    return None\n")
    nodes = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "node0") if rank == 0 else "", "HF_HUB_OFFLINE": "1"}
        nodes.append(subprocess.Popen([sys.executable, "-m", "swiftk", "run", str(cfg),
                                       f"--set=distributed.node_rank={rank}"],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] != [0, 0], outputs
    assert "rank 1 (node_rank 1, local rank 0): plugins: 'swk_node0_plugin' failed to load" in outputs[0], outputs[0]
    assert "did not join" not in outputs[0] + outputs[1]


# ------------------------------------------------------------------------------------------ clear errors (fast)


CUDA = pytest.param(True, marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="needs a CUDA device")])


@pytest.mark.parametrize("cuda", [False, CUDA])
def test_the_process_group_carries_cpu_agreements_and_cuda_tensors(cuda: bool, tmp_path: Path) -> None:
    """The ranks' agreements all-reduce CPU tensors on GPUs too: a plain "nccl" group fails them ("No backend type
    associated with device type cpu"), so CUDA runs start one backend per device type."""
    spec = dist.backend_spec(cuda)
    assert spec == ("cpu:gloo,cuda:nccl" if cuda else "gloo")
    torch.distributed.init_process_group(spec, store=torch.distributed.FileStore(str(tmp_path / "store"), 1),
                                         rank=0, world_size=1)
    try:
        assert dist.any_rank(True, False) == [True, False]
        assert dist.sum_across_ranks(2.5) == 2.5
        if cuda:
            tensor = torch.ones(3, device="cuda")
            torch.distributed.all_reduce(tensor)
            assert tensor.tolist() == [1.0, 1.0, 1.0]
    finally:
        torch.distributed.destroy_process_group()


def test_a_rank_that_never_joins_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    port = launch.free_port("127.0.0.1")
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(dist.DistributedError, match=r"rank 1 \(node_rank 1, local rank 0\) did not join within 1 s"):
        dist.join(dist.from_env(), 1.0)


def test_a_port_in_use_is_reported() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(dist.DistributedError, match=f"master_port {port} on 127.0.0.1 is not free"):
            launch.check_port("127.0.0.1", port)


def test_distributed_config_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, nnodes=2, node_rank=2)
    with pytest.raises(ConfigError, match="node_rank 2 must be below nnodes 2"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="zero_stage: only for backend = 'deepspeed'"):
        load_config(config(tmp_path / "d.toml", tmp_path / "run", processes=2, zero_stage=3))


def test_deepspeed_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    cfg = load_config(config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="deepspeed"))
    (problem,) = dist.config_problems(cfg.distributed)
    assert "DeepSpeed is not installed" in problem and "pip install" in problem
