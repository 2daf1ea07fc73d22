"""Tests for config loading: every problem at once with its location, ms-swift key names, --set, and the CLI."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from swiftk.kernel.cli import main
from swiftk.kernel.config import load_config, parse_override
from swiftk.kernel.errors import ConfigError

MINIMAL = """\
[model]
model_id = "data/tiny_tokenizer"

[data]
train_file = "data/synthetic/addition_train.jsonl"

[output]
dir = "runs/never-written"
"""

BAD_TOML = """\
[model]
model_id = "data/tiny_tokenizer"

[train]
lora_rnak = 4
lr = -1.0
tuner_strategy = "adalora"

[output]
dir = "runs/never-written"
"""

BAD_YAML = """\
model:
  model_id: data/tiny_tokenizer
train:
  lora_rnak: 4
  lr: -1.0
  tuner_strategy: adalora
output:
  dir: runs/never-written
"""


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name, text, lines", [
    ("bad.toml", BAD_TOML, {"lora_rnak": 5, "lr": 6, "tuner_strategy": 7}),
    ("bad.yaml", BAD_YAML, {"lora_rnak": 4, "lr": 5, "tuner_strategy": 6}),
])
def test_every_problem_is_reported_at_once_with_key_and_line(
    tmp_path: Path, name: str, text: str, lines: dict[str, int]
) -> None:
    path = write(tmp_path, text, name)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = {problem.split(":", 1)[0]: problem for problem in caught.value.problems}
    assert set(found) == {"[data]", "[train] lora_rnak", "[train] lr", "[train] tuner_strategy"}
    for key, line in lines.items():
        assert found[f"[train] {key}"].endswith(f"({path}:{line})")
    assert "unknown key; did you mean 'lora_rank'?" in found["[train] lora_rnak"]
    assert "greater than 0" in found["[train] lr"]
    assert "no tuner named 'adalora'; did you mean 'lora'? known: dora, freeze, full, galore, lora, qlora" in \
        found["[train] tuner_strategy"]
    assert found["[data]"] == f"[data]: required table is missing ({path})"


def test_ms_swift_key_names_are_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + """
[train]
learning_rate = 3e-4
per_device_train_batch_size = 2
gradient_accumulation_steps = 8
num_train_epochs = 3
dtype = "bfloat16"
train_type = "lora"
lora_rank = 16
lora_alpha = 64
loss_type = "cross_entropy"
loss_config = { label_smoothing = 0.1 }
""")
    train = load_config(path).train
    assert (train.lr, train.batch_size, train.grad_accum, train.epochs) == (3e-4, 2, 8, 3.0)
    assert (train.precision, train.tuner_strategy, train.lora_rank, train.lora_alpha) == ("bf16", "lora", 16, 64.0)
    assert (train.loss_type, train.loss_config) == ("cross_entropy", {"label_smoothing": 0.1})


@pytest.mark.parametrize("item, key, value", [
    ("train.lr=1e-4", ("train", "lr"), 1e-4),
    ('train.lora_target_modules=["q_proj", "v_proj"]', ("train", "lora_target_modules"), ["q_proj", "v_proj"]),
    ("train.loss_config={ label_smoothing = 0.1 }", ("train", "loss_config"), {"label_smoothing": 0.1}),
    ("model.model_id=./my-model", ("model", "model_id"), "./my-model"),
    ("data.train_file=/data/train set.jsonl", ("data", "train_file"), "/data/train set.jsonl"),
])
def test_parse_override_reads_toml_values_and_bare_strings(item: str, key: tuple[str, ...], value: object) -> None:
    assert parse_override(item) == (key, value)


def test_overrides_apply_and_their_problems_point_at_set(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[train]\nlearning_rate = 3e-4\n")
    cfg = load_config(path, ["train.lr=2e-5", "data.max_length=64", "model.model_id=./my-model"])
    # The override wins over the file's alias of the same field.
    assert (cfg.train.lr, cfg.data.max_length, cfg.model.model_id) == (2e-5, 64, "./my-model")
    with pytest.raises(ConfigError) as caught:
        load_config(path, ["train.batch_size=0", "train.lr"])
    first, second = sorted(caught.value.problems)
    assert first.startswith("--set 'train.lr': expected KEY=VALUE")
    assert second.startswith("[train] batch_size: Input should be greater than or equal to 1")
    assert second.endswith("(--set)")


def test_unsupported_quantization_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[train]\nquantization_bit = 3\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.startswith("[train] quantization_bit: bitsandbytes quantizes to 4 or 8 bits; 3 is not supported")
    assert problem.endswith(f"({path}:11)")


@pytest.mark.parametrize("override, fragments", [
    ("train.lr=-1", ["[train] lr: Input should be greater than 0", "(--set)"]),
    ("train.loss_type=cross_entropi",
     ["[train] loss_type = 'cross_entropi'", "no loss named 'cross_entropi'", "did you mean 'cross_entropy'"]),
    ("train.loss_config={ nope = 1 }", ["loss_config", "'nope'", "it accepts: label_smoothing=0.0"]),
    ("data.train_file=data/missing.jsonl", ["[data] train_file: data/missing.jsonl does not exist"]),
])
def test_cli_reports_config_problems_with_exit_2_and_writes_nothing(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, fragments: list[str]
) -> None:
    assert main(["run", str(tiny_config), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ConfigError: 1 problem in ")
    for fragment in fragments:
        assert fragment in err
    assert not (tmp_path / "run").exists()


def test_print_config_shows_defaults_and_writes_nothing(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tiny_config), "--print-config", "--set", "train.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    assert "gradient_checkpointing = false" in out  # a default: tiny_sft.toml does not set it
    resolved = tomllib.loads(out)
    assert (resolved["train"]["lr"], resolved["train"]["max_steps"], resolved["data"]["max_length"]) == (5e-4, 12, 32)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    ('[[plugins]]\npath = "p.py"\nisolation = "sandbox"\ntenant = "carol"\n[tenants.alice]\nplugins = []\n',
     "tenant 'carol' has no [tenants.carol] table (tenants: alice)"),
    ('[[plugins]]\npath = "p.py"\nisolation = "process"\ntenant = "alice"\n',
     "`tenant` is for isolation = 'sandbox' (isolation is 'process')"),
    ('[tenants.Alice]\nplugins = ["p.py"]\n', "tenant names ['Alice']: use 1-32 lowercase letters"),
    ('[tenants.a]\nuid = 62000\n[tenants.b]\nuid = 62000\n', "two [tenants] tables set the same uid"),
    ('[tenants.a]\nuid = 0\n', "[tenants.a] uid: Input should be greater than or equal to 1000"),
    ('[sandbox]\nrequire = ["seccomp", "selinux"]\n', "[sandbox] require: Input should be 'uid', 'namespaces'"),
])
def test_tenant_and_sandbox_mistakes_are_config_errors(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, extra + MINIMAL))
    assert message in str(caught.value)


def test_a_config_saved_before_components_owned_their_keys_still_loads(tmp_path: Path) -> None:
    """A wave-1 run's config.toml holds every stage's and tuner's keys; reading it back for export or resume
    drops the ones its stage and tuner do not have (a new config with them is still refused)."""
    old = MINIMAL + '[train]\nstage = "sft"\ntuner_strategy = "full"\nbeta = 0.1\nlabel_smoothing = 0.0\n' \
                    'precompute_ref_logps = false\nlora_rank = 8\ngalore_rank = 128\nfreeze_trainable_layers = 2\n'
    path = write(tmp_path, old)
    train = load_config(path, saved=True).train
    assert (train.stage, train.tuner_strategy) == ("sft", "full") and not hasattr(train, "lora_rank")
    with pytest.raises(ConfigError, match="lora_rank: unknown key; it belongs to tuner"):
        load_config(path)
