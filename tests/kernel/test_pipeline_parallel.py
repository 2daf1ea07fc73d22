"""Pipeline parallelism (``[distributed] backend = "pp"``) on CPU (gloo): the tiny Llama (tied embeddings) split
into 2 stages reproduces the one-process loss curve, held-out loss and final weights on both schedules; 4 ranks
(dp 2 x pp 2) do too; checkpoints resume under the same and other layouts; LoRA's adapter and merged model are the
one process's; what cannot be pipelined is an error naming the setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from swiftk.kernel.cli import main
from swiftk.kernel.config import DistributedConfig, load_config
from swiftk.kernel.dist import DistInfo, DistributedError
from swiftk.kernel.parallel import engine_class
from swiftk.kernel.parallel.pp import PipelineParallel, parts, stage_bounds

from .test_dist import CONFIG, assert_matches, losses, swiftk, variant
from .test_tensor_parallel import assert_same_weights

STEPS = 6


def config(path: Path, out: Path, processes: int = 1, batch: int = 8, tied: bool = True, layers: int = 2,
           **distributed: object) -> Path:
    """test_dist's tiny Llama (with tied embeddings; ``layers`` decoder layers), 2 micro-batches a step (1F1B needs
    one per stage), held-out loss at steps 3 and 6."""
    table = {"num_processes": processes, **distributed}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in table.items())
    text = CONFIG.format(batch=batch, steps=STEPS, out=out, save_every=3, distributed=lines)
    text = text.replace("num_hidden_layers = 2", f"num_hidden_layers = {layers}")
    text = text.replace("tie_word_embeddings = false", f"tie_word_embeddings = {str(tied).lower()}")
    text = text.replace("[train]\n", "[train]\ngrad_accum = 2\n")
    text = text.replace("max_length = 32\n", 'max_length = 32\neval_file = "data/synthetic/addition_eval.jsonl"\n')
    path.write_text(text + "[eval]\nevery = 3\n")
    return path


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run, in this process."""
    tmp = tmp_path_factory.mktemp("one")
    assert main(["run", str(config(tmp / "c.toml", tmp / "run"))]) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run of the model with a head of its own."""
    tmp = tmp_path_factory.mktemp("untied")
    assert main(["run", str(config(tmp / "c.toml", tmp / "run", tied=False))]) == 0
    return tmp / "run"


def evals(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if r.get("event") == "eval"}


def assert_reproduces(run: Path, one: Path) -> None:
    assert_matches(losses(run), losses(one))
    got, want = evals(run), evals(one)
    assert sorted(got) == [3, 6] and all(got[s] == pytest.approx(want[s], rel=1e-5) for s in got), (got, want)
    assert_same_weights(run / "final", one / "final")


# ------------------------------------------------------------------------------------------ the split


def test_stages_balance_parameters_or_layers() -> None:
    # embeddings on the first stage and the head on the last weigh like two layers each
    costs = [3.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 3.0]
    assert stage_bounds(costs, 2) == [0, 4, 8]
    assert stage_bounds(costs, 4) == [0, 1, 4, 7, 8]
    assert stage_bounds([1.0] * 6, 3) == [0, 2, 4, 6]
    assert stage_bounds([1.0] * 5, 5) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DistributedError, match="pp_size = 3 is more pipeline stages than the model's 2 decoder "
                                                "layers"):
        stage_bounds([1.0, 1.0], 3)


def test_an_architecture_the_stages_do_not_reproduce_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=40))
    with pytest.raises(DistributedError, match="gpt2 models are not split into pipeline stages yet"):
        parts(model)


def test_pipelines_read_different_data() -> None:
    """Ranks 0-1 and 2-3 are pipelines: each reads its half of the data, every stage of it the same batch."""
    options = DistributedConfig(backend="pp", num_processes=4, pp_size=2)
    engines = [PipelineParallel(DistInfo(rank=r, world_size=4), options) for r in range(4)]
    assert [e.data_shard for e in engines] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [e.stage for e in engines] == [0, 1, 0, 1] and engines[0].replicas == 2


def test_a_dp_by_pp_by_tp_mesh_lays_ranks_out_tp_first() -> None:
    """8 ranks as dp 2 x pp 2 x tp 2: each stage's TP group is two neighbouring ranks (inside a node), a pipeline
    four ranks reading one batch; the first and last stage's ranks holding the same TP piece are paired."""
    options = DistributedConfig(backend="pp", num_processes=8, pp_size=2, tp_size=2)
    engines = [PipelineParallel(DistInfo(rank=r, world_size=8), options) for r in range(8)]
    assert [e.data_shard for e in engines] == [(0, 2)] * 4 + [(1, 2)] * 4 and engines[0].replicas == 4
    assert [e.stage for e in engines] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [e.tp_rank for e in engines] == [0, 1] * 4
    assert [engines[5].rank_of(s) for s in (0, 1)] == [5, 7] and engines[0].rank_of(1, 1, 0) == 6
    (problem,) = engine_class("pp").problems(DistributedConfig(backend="pp", num_processes=6, pp_size=2, tp_size=2))
    assert "pp_size = 2 x tp_size = 2 ranks a pipeline does not divide the 6 processes" in problem
    (problem,) = engine_class("pp").problems(DistributedConfig(backend="pp", num_processes=2, tp_size=2))
    assert "tp_size = 2 leaves one pipeline stage on the 2 processes: set pp_size" in problem
    (problem,) = engine_class("pp").problems(DistributedConfig(backend="pp", num_processes=2, nnodes=4, pp_size=2,
                                                               tp_size=4, master_port=29500))
    assert "tp_size = 4 would split a stage across machines (num_processes = 2 per node)" in problem
    with pytest.raises(ValueError, match=r"sequence_parallel: only for backend = 'tp' \(backend is 'pp'\)"):
        DistributedConfig(backend="pp", tp_size=2, sequence_parallel=True)


def test_layouts_and_runs_that_cannot_be_pipelined_are_config_errors(tmp_path: Path) -> None:
    from swiftk.kernel.parallel.config import apply_device

    with pytest.raises(ValueError, match="pp_size, pp_schedule: only for backend = 'pp'"):
        DistributedConfig(backend="ddp", pp_size=2, pp_schedule="gpipe")
    DistributedConfig(backend="ddp", pp_schedule="1f1b", pp_balance="memory")  # the defaults, as config.toml saves
    (problem,) = engine_class("pp").problems(DistributedConfig(backend="pp", num_processes=3, pp_size=2))
    assert "pp_size = 2 does not divide the 3 processes" in problem
    path = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="pp")
    text = path.read_text().replace("grad_accum = 2", "grad_accum = 1").replace("[train]\n", '[train]\nstage = "dpo"\n')
    text = text.replace("[data]\n", "[data]\npacking = true\n").replace("addition_train", "addition_pref_train")
    path.write_text(text)
    problems = PipelineParallel.run_problems(load_config(path))
    assert len(problems) == 3, problems
    assert "[train] stage = 'dpo': backend = 'pp' trains stages whose step is one forward" in problems[0]
    assert "[train] grad_accum = 1: the 1F1B schedule needs at least as many micro-batches per step as " \
           "pipeline stages (2)" in problems[1] and "pp_schedule = 'gpipe'" in problems[1]
    assert "[data] packing: not with backend = 'pp'" in problems[2]
    qlora = variant(config(tmp_path / "q.toml", tmp_path / "run", processes=4, backend="pp", pp_size=2), qlora=True)
    assert PipelineParallel.run_problems(load_config(qlora)) == []  # FSDP2 shards the 4-bit codes across pipelines
    deep = config(tmp_path / "s.toml", tmp_path / "run", processes=3, backend="pp", pp_schedule="gpipe")
    (problem,) = PipelineParallel.run_problems(load_config(deep))
    assert "pp_size = 3 is more pipeline stages than the model's 2 decoder layers" in problem
    with pytest.raises(ValueError, match="the '1f1b' schedule runs one stage per rank; use pp_schedule = "):
        DistributedConfig(backend="pp", pp_stages_per_rank=2)
    looped = config(tmp_path / "i.toml", tmp_path / "run", processes=2, backend="pp", pp_schedule="zero_bubble")
    (problem,) = PipelineParallel.run_problems(load_config(looped))
    assert "pp_size = 2 x pp_stages_per_rank = 2 is more pipeline stages than the model's 2 decoder layers" in problem
    rounds = config(tmp_path / "r.toml", tmp_path / "run", processes=2, layers=4, backend="pp",
                    pp_schedule="interleaved_1f1b")
    rounds.write_text(rounds.read_text().replace("grad_accum = 2", "grad_accum = 5"))
    (problem,) = PipelineParallel.run_problems(load_config(rounds))
    assert "grad_accum = 5: the interleaved_1f1b schedule runs the micro-batches in rounds of pp_size (2)" in problem
    assert "use grad_accum = 4" in problem
    device = config(tmp_path / "d.toml", tmp_path / "run", processes=2)
    device.write_text(device.read_text() + '[device]\nparallel_method = "pp"\nnum_gpus = 2\n')
    cfg = load_config(device)
    assert apply_device(cfg) == [] and (cfg.distributed.backend, cfg.distributed.num_processes) == ("pp", 2)


# ------------------------------------------------------------------------------------------ whole runs


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_two_stages_reproduce_one_process(schedule: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Stage 0 holds the embeddings and layer 0, stage 1 layer 1, the norm and the head (tied to the embeddings
    under 1F1B, its own under GPipe); the step's two micro-batches go through on either schedule: the loss curve,
    the held-out loss (through the pipeline) and the final weights are the one process's."""
    tied = schedule == "1f1b"
    done = swiftk(str(config(tmp_path / "c.toml", tmp_path / "run", processes=2, tied=tied, backend="pp",
                             pp_schedule=schedule)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steps of 16 samples (batch_size 8 x grad_accum 2)" in done.stdout
    assert f"pipeline: 2 stages of layers 0 | 1 on 2 ranks ({schedule}: one stage per rank)" in done.stdout
    assert_reproduces(tmp_path / "run", request.getfixturevalue("one" if tied else "untied"))


@pytest.mark.parametrize("schedule", ["interleaved_1f1b", pytest.param("zero_bubble", marks=pytest.mark.slow)])
def test_two_stages_per_rank_reproduce_one_process(schedule: str, tmp_path: Path) -> None:
    """A 4-layer model cut into 4 stages of one layer, rank 0 holding stages 0 and 2 (the embeddings with the
    first), rank 1 stages 1 and 3 (the norm and the tied head with the last): on the interleaved 1F1B and the
    zero-bubble schedules, the loss curve, the held-out loss and the final weights are the one process's."""
    assert main(["run", str(config(tmp_path / "one.toml", tmp_path / "one", layers=4))]) == 0
    done = swiftk(str(config(tmp_path / "c.toml", tmp_path / "run", processes=2, layers=4, backend="pp",
                             pp_schedule=schedule)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pipeline: 4 stages of layers 0 | 1 | 2 | 3 on 2 ranks ({schedule}: rank r holds stages r, r + 2)" \
        in done.stdout
    assert_reproduces(tmp_path / "run", tmp_path / "one")


@pytest.mark.slow
def test_dp2_by_pp2_reproduces_one_process_and_resumes(one: Path, tmp_path: Path) -> None:
    """4 ranks: two pipelines of 2 stages, each reading half of the batch, every stage sharded by FSDP2 between
    the pipelines; the checkpoint of step 3 resumes exactly."""
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=4, batch=4, backend="pp", pp_size=2)
    done = swiftk(str(cfg), timeout=360)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "steps of 16 samples (batch_size 4 x grad_accum 2 x 2 data-parallel groups)" in done.stdout
    assert_reproduces(tmp_path / "run", one)
    shutil.rmtree(tmp_path / f"run/checkpoints/step-{STEPS:06d}")
    resumed = swiftk(str(cfg), "--resume", timeout=360)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from step 3" in resumed.stdout
    assert_matches(losses(tmp_path / "run"), losses(one))


@pytest.mark.slow
def test_a_pp2_checkpoint_resumes_under_pp2_and_in_one_process_and_back(one: Path, tmp_path: Path) -> None:
    """Checkpoints hold the whole model's tensors by name: pp2's step 3 continues under pp2 and in one process, and
    one process's under pp2, each replaying the uninterrupted curve."""
    done = swiftk(str(config(tmp_path / "c.toml", tmp_path / "pp2", processes=2, backend="pp")))
    assert done.returncode == 0, done.stdout + done.stderr
    runs = (("same", tmp_path / "pp2", 2, "pp"), ("alone", tmp_path / "pp2", 1, "ddp"), ("to_pp", one, 2, "pp"))
    for name, source, processes, backend in runs:
        shutil.copytree(source, tmp_path / name)
        shutil.rmtree(tmp_path / f"{name}/checkpoints/step-{STEPS:06d}")
        cfg = config(tmp_path / f"{name}.toml", tmp_path / name, processes=processes, backend=backend)
        resumed = swiftk(str(cfg), "--resume")
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "from step 3" in resumed.stdout
        assert_matches(losses(tmp_path / name), losses(one))


@pytest.mark.slow
@pytest.mark.parametrize("tuner", ["lora", "qlora"])
def test_lora_under_pp2_saves_and_merges_the_one_process_model(tuner: str, tmp_path: Path) -> None:
    """Each stage trains the adapters of its layers (QLoRA: on its 4-bit layers); the saved adapter (every
    layer's) and the merged model are the one process's. QLoRA's 4-bit CPU matmuls round differently at another
    batch shape (one process at 8 x 2 and at 4 x 4 rows differ by ~2e-4 in the adapter after 6 steps; the
    pipeline pads a step's micro-batches to one shape): its losses agree to 1e-4 (1.5e-5 apart at step 4 on an
    AVX512-BF16 CPU, whose 4-bit kernels differ from the AVX2 ones; the code before interleaved stages gave the
    same numbers), its adapter to 2e-2."""
    runs = {}
    for name, processes, backend in (("one", 1, "ddp"), ("pp2", 2, "pp")):
        cfg = variant(config(tmp_path / f"{name}.toml", tmp_path / name, processes=processes, backend=backend),
                      lora=tuner == "lora", qlora=tuner == "qlora")
        cfg.write_text(cfg.read_text().replace("keep_last = 5", "keep_last = 5\nmerge = true")
                       + '[samples]\nprompts = ["1 + 2 ="]\n')
        runs[name] = swiftk(str(cfg))
        assert runs[name].returncode == 0, runs[name].stdout + runs[name].stderr
    got_losses, want_losses = losses(tmp_path / "pp2"), losses(tmp_path / "one")
    if tuner == "lora":
        assert_matches(got_losses, want_losses)
    else:
        assert sorted(got_losses) == sorted(want_losses)
        assert all(got_losses[s] == pytest.approx(want_losses[s], rel=1e-4) for s in got_losses), got_losses
    assert "samples: off under backend = 'pp' (no rank holds the whole model" in runs["pp2"].stdout
    if tuner == "lora":
        assert_same_weights(tmp_path / "pp2/final", tmp_path / "one/final", "adapter_model.safetensors")
        assert_same_weights(tmp_path / "pp2/merged", tmp_path / "one/merged")
        return
    got, want = (load_file(tmp_path / f"{name}/final/adapter_model.safetensors") for name in ("pp2", "one"))
    assert got.keys() == want.keys() and len(got) == 28  # 2 layers x 7 projections x (A, B)
    assert max(float((got[k] - want[k]).abs().max()) for k in got) < 2e-2


@pytest.mark.slow
def test_qlora_under_dp2_by_pp2_reproduces_one_process(tmp_path: Path) -> None:
    """Two pipelines of 2 stages, FSDP2 sharding each stage's adapters and 4-bit codes over the two: with the NF4
    weights dequantized to float32 for each matmul, the losses and the adapter are the one process's."""
    runs = {}
    for name, processes, batch, backend in (("one", 1, 8, "ddp"), ("dp2pp2", 4, 4, "pp")):
        cfg = variant(config(tmp_path / f"{name}.toml", tmp_path / name, processes=processes, batch=batch,
                             backend=backend, **({"pp_size": 2} if processes > 1 else {})), qlora=True)
        cfg.write_text(cfg.read_text().replace("quantization_bit = 4", 'quantization_bit = 4\n'
                                               'bnb_4bit_compute_dtype = "float32"'))
        runs[name] = swiftk(str(cfg), timeout=360)
        assert runs[name].returncode == 0, runs[name].stdout + runs[name].stderr
    assert "x 2 data-parallel groups" in runs["dp2pp2"].stdout
    assert_matches(losses(tmp_path / "dp2pp2"), losses(tmp_path / "one"))
    assert_same_weights(tmp_path / "dp2pp2/final", tmp_path / "one/final", "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pp2xtp2", "dp2xpp2xtp2"])
def test_pipelines_of_tensor_parallel_stages_reproduce_one_process(layout: str, tmp_path: Path) -> None:
    """Each of 2 stages split over 2 ranks (tp inside the stage: its projections by heads and columns, the tied
    embeddings on the first stage and the head on the last by vocabulary rows, their gradients added between the
    two ends piece by piece), in one pipeline of 4 ranks or two of them with FSDP2 across (8 ranks, the 3-D mesh):
    the loss curve, the held-out loss and the final weights are the one process's; a checkpoint resumes in one
    process (pp2 x tp2) or in the same layout (dp2 x pp2 x tp2)."""
    def wide(path: Path) -> Path:  # vocabulary rows that divide over dp x tp ranks
        path.write_text(path.read_text().replace("num_key_value_heads = 4,", "num_key_value_heads = 4, "
                                                 "vocab_size = 128,"))
        return path

    assert main(["run", str(wide(config(tmp_path / "one.toml", tmp_path / "one")))]) == 0
    processes = 8 if layout.startswith("dp2") else 4
    cfg = wide(config(tmp_path / "c.toml", tmp_path / "run", processes=processes, batch=32 // processes,
                      backend="pp", pp_size=2, tp_size=2))
    done = swiftk(str(cfg), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pipeline: 2 stages of layers 0 | 1 on 2 ranks (1f1b: one stage per rank), each stage split over 2 " \
           "ranks (tp)" in done.stdout
    assert "x 2 data-parallel groups" in done.stdout if processes == 8 else "data-parallel" not in done.stdout
    assert_reproduces(tmp_path / "run", tmp_path / "one")
    shutil.rmtree(tmp_path / f"run/checkpoints/step-{STEPS:06d}")
    again = cfg if processes == 8 else wide(config(tmp_path / "alone.toml", tmp_path / "run", backend="ddp"))
    resumed = swiftk(str(again), "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from step 3" in resumed.stdout
    assert_matches(losses(tmp_path / "run"), losses(tmp_path / "one"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["zero_bubble", "qlora"])
def test_interleaved_and_qlora_pipelines_of_tensor_parallel_stages_reproduce_one_process(kind: str,
                                                                                         tmp_path: Path) -> None:
    """pp 2 x tp 2 with two stages of one layer on each rank (the zero-bubble schedule, its backward split into
    the inputs' and the weights' gradients), or with QLoRA's 4-bit layers split in each stage (float32 compute):
    the one process's losses and weights (QLoRA: its adapter)."""
    from .test_tensor_parallel import qlora

    def made(path: Path, out: Path, **options: object) -> Path:
        if kind == "qlora":
            return qlora(config(path, out, **options))
        return config(path, out, layers=4, **options)

    assert main(["run", str(made(tmp_path / "one.toml", tmp_path / "one"))]) == 0
    extra = {"pp_schedule": "zero_bubble"} if kind == "zero_bubble" else {}
    done = swiftk(str(made(tmp_path / "c.toml", tmp_path / "run", processes=4, backend="pp", pp_size=2, tp_size=2,
                           **extra)), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "each stage split over 2 ranks (tp)" in done.stdout
    assert_matches(losses(tmp_path / "run"), losses(tmp_path / "one"))
    name = "adapter_model.safetensors" if kind == "qlora" else "model.safetensors"
    assert_same_weights(tmp_path / "run/final", tmp_path / "one/final", name)


@pytest.mark.slow
def test_two_nodes_each_a_tp_split_stage_reproduce_one_process(tmp_path: Path) -> None:
    """Two `swiftk run`s of 2 processes each at one loopback rendezvous, pp 2 x tp 2: each "node" holds one stage
    split over its 2 ranks (tp inside a node, the pipeline across nodes), as on two machines."""
    from swiftk.kernel import launch

    assert main(["run", str(config(tmp_path / "one.toml", tmp_path / "one"))]) == 0
    port = launch.free_port("127.0.0.1")
    cfg = config(tmp_path / "c.toml", tmp_path / "run", processes=2, backend="pp", pp_size=2, tp_size=2, nnodes=2,
                 master_port=port, join_timeout_s=120)
    nodes = [swiftk(str(cfg), f"--set=distributed.node_rank={rank}", wait=False) for rank in (0, 1)]
    outputs = [node.communicate(timeout=480)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert "each stage split over 2 ranks (tp)" in outputs[0]
    assert_reproduces(tmp_path / "run", tmp_path / "one")
