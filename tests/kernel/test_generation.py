"""The [generation] table, the configured generator, and the weight sync that keeps a generator on the trained
weights: a generator over a separate copy of the model (as an engine in another process holds) answers like the
trained model only after ``push_weights``."""

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from swiftk.contracts import SamplingParams
from swiftk.kernel.cli import main
from swiftk.kernel.config import GenerationConfig
from swiftk.kernel.generation import configured_generator, push_weights
from swiftk.kernel.tiny import build_char_tokenizer
from swiftk.plugins.generators.hf import HFGenerator
from tests.conftest import write_config

PROMPTS = ["12+7=", "reverse abc:"]
GREEDY = SamplingParams(max_new_tokens=8)


class Copy(HFGenerator):
    """An hf generator over its own copy of the model: like a remote engine, it sees only what is pushed."""

    shares_weights = False


def tiny_llama(tok: transformers.PreTrainedTokenizerBase) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok))
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def train_a_little(model: torch.nn.Module, tok: transformers.PreTrainedTokenizerBase) -> None:
    """A few large steps on one sequence: enough to change every greedy answer."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=5.0)
    ids = tok("12+7=zzzzzzzzzzzzzzzz", return_tensors="pt").input_ids
    for _ in range(5):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_push_weights_makes_a_separate_generator_answer_as_the_trained_model(tuner: str) -> None:
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    if tuner == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    engine = Copy(copy.deepcopy(model), tok)
    live = HFGenerator(model, tok)
    train_a_little(model, tok)
    trained = [c.token_ids for c in live.generate(PROMPTS, GREEDY)]
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] != trained  # the copy still has the old weights
    assert push_weights(engine, model, 5) == 5 == engine.version
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == trained


def test_parameters_a_stage_added_are_not_pushed() -> None:
    """PPO's value head trains with the model, but the engine serves a causal LM without one."""
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    model.v_head = torch.nn.Linear(32, 1)
    pushed: dict[str, torch.Tensor] = {}

    class Recorder(Copy):
        def load_weights(self, version: int, tensors=None, adapter=None) -> int:  # type: ignore[no-untyped-def]
            pushed.update(tensors or {})
            return version

    push_weights(Recorder(copy.deepcopy(model), tok), model, 1, skip={"v_head.weight", "v_head.bias"})
    assert "model.embed_tokens.weight" in pushed and not any(name.startswith("v_head") for name in pushed)


def test_a_generator_over_the_live_model_is_told_the_version_only() -> None:
    tok = build_char_tokenizer()
    model = tiny_llama(tok)
    live = configured_generator(GenerationConfig(batch_size=4), model, tok)
    assert isinstance(live, HFGenerator) and live.model is model and live.batch_size == 4
    before = [c.token_ids for c in live.generate(PROMPTS, GREEDY)]
    assert push_weights(live, model, 3) == 3 == live.version
    assert [c.token_ids for c in live.generate(PROMPTS, GREEDY)] == before


def test_sampling_defaults_come_from_the_table_and_overrides_win() -> None:
    table = GenerationConfig(temperature=0.7, top_p=0.9, stop=["\n"], max_new_tokens=32, seed=1)
    assert table.sampling() == SamplingParams(max_new_tokens=32, temperature=0.7, top_p=0.9, stop=("\n",), seed=1)
    assert table.sampling(temperature=0.0, max_new_tokens=None, stop=["END"]) == \
        SamplingParams(max_new_tokens=32, temperature=0.0, top_p=0.9, stop=("END",), seed=1)


ENGINE_PLUGIN = '''
import json, os
from swiftk.contracts import register_generator
from swiftk.plugins.generators.hf import HFGenerator

@register_generator("recording")
class Recording(HFGenerator):
    """The hf generator, writing each call's prompts to a file: shows which generator the run used."""

    def __init__(self, model, tokenizer, *, log, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.log = log

    def generate(self, prompts, sampling, *, templated=False):
        with open(self.log, "a") as f:
            f.write(json.dumps({"prompts": list(prompts), "version": self.version}) + "\\n")
        return super().generate(prompts, sampling, templated=templated)
'''


def test_a_run_samples_and_evaluates_with_the_configured_generator(tiny_config: Path, tmp_path: Path,
                                                                   capsys) -> None:
    plugin = tmp_path / "recording.py"
    plugin.write_text(ENGINE_PLUGIN)
    log = tmp_path / "calls.jsonl"
    cfg = write_config(tmp_path / "c.toml", f'plugins = ["{plugin}"]\n' + tiny_config.read_text(), max_steps="2")
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text("".join(Path("data/synthetic/addition_eval.jsonl").read_text().splitlines(True)[:8]))
    text = cfg.read_text().replace("data/synthetic/addition_eval.jsonl", str(held_out))
    cfg.write_text(text + f'\n[samples]\nprompts = ["1+1="]\n\n[generation]\nengine = "recording"\n'
                          f'engine_args = {{log = "{log}"}}\n')
    assert main(["run", str(cfg)]) == 0, capsys.readouterr().err
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    is_sample = [len(c["prompts"]) == 1 and "user\n1+1=" in c["prompts"][0] for c in calls]  # chat-rendered
    samples = [c["version"] for c, sample in zip(calls, is_sample, strict=True) if sample]
    evals = [c for c, sample in zip(calls, is_sample, strict=True) if not sample]
    assert samples == [0, 2]  # before training, and after its 2 steps (the generator serves step 2's weights)
    assert [len(c["prompts"]) for c in evals] == [8] and evals[0]["version"] == 2


def test_an_unknown_engine_is_a_config_error_naming_the_known_ones(tiny_config: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(tiny_config.read_text() + '\n[generation]\nengine = "vlm"\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "[generation] engine" in err and "c.toml:" in err and "no generator named 'vlm'" in err and "hf" in err


KILL_ENGINE = '''
import os, signal
import psutil
from swiftk.contracts import hookimpl

@hookimpl
def swiftk_step_end(state, metrics):
    """At step 2, SIGKILL the vLLM engine the run started for its samples (a crash the run must survive)."""
    if state.step == 2:
        for child in psutil.Process().children(recursive=True):
            if any("vllm_engine.py" in part for part in child.cmdline()):
                os.kill(child.pid, signal.SIGKILL)
                return {"engine_killed": 1.0}
    return None
'''


@pytest.mark.engines
@pytest.mark.timeout(900)
def test_a_run_with_the_vllm_engine_survives_its_death_and_answers_with_the_trained_weights(
        tiny_config: Path, tmp_path: Path, capsys) -> None:
    """[generation] engine = "vllm" end to end: the engine starts from the random init's live weights for the
    samples before training, is SIGKILLed at step 2, is restarted by the next request, is sent the trained weights,
    and answers the samples after training exactly as the trained model does under hf (fp32 both)."""
    from swiftk.kernel.export import load_trained

    plugin = tmp_path / "kill_engine.py"
    plugin.write_text(KILL_ENGINE)
    cfg = write_config(tmp_path / "c.toml", f'plugins = ["{plugin}"]\n' + tiny_config.read_text(), max_steps="4",
                       precision='"fp32"', exact_match="false")
    cfg.write_text(cfg.read_text() + '\n[samples]\nprompts = ["1+1=", "12+34="]\nmax_new_tokens = 6\n\n'
                                     '[generation]\nengine = "vllm"\n')
    assert main(["run", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "restarting the engine" in out, out
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    trained = load_trained(tmp_path / "run")
    live = HFGenerator(trained.model, trained.tokenizer)
    rendered = [trained.tokenizer.apply_chat_template([{"role": "user", "content": s["prompt"]}], tokenize=False,
                                                      add_generation_prompt=True) for s in samples]
    expected = [c.text.strip() for c in live.generate(rendered, SamplingParams(max_new_tokens=6), templated=True)]
    assert [s["after"] for s in samples] == expected
