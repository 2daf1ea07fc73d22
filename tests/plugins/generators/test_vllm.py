"""The vLLM generator against a real engine (the managed vllm environment) on a tiny random Llama, float32.

HFGenerator on the same weights is the reference: greedy token ids must be equal, logprobs close. One engine serves
the whole module (a start takes 30-140 s on 2 cores); tests that change its weights run in file order and say what
they leave behind. Run with `make test-engines`.
"""

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from swiftk.contracts import Adapter, Generator, SamplingParams
from swiftk.kernel import envs
from swiftk.kernel.tiny import build_char_tokenizer
from swiftk.plugins.generators.hf import HFGenerator
from swiftk.plugins.generators.vllm import EngineError, VLLMGenerator

pytestmark = [pytest.mark.engines, pytest.mark.timeout(900)]  # the first engine start may take minutes
PROMPTS = ["12+7=", "reverse abc:", "a"]
GREEDY = SamplingParams(max_new_tokens=12, logprobs=True)
REPORTS: list[str] = []


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerBase:
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def base(tok: transformers.PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(2)  # with initializer_range 0.18: varied greedy text (a tied model at 0.02 repeats its input)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True,  # as SmolLM2
                                      initializer_range=0.18)
    folder = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load(folder: Path) -> transformers.PreTrainedModel:
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module")
def gen(tok: transformers.PreTrainedTokenizerBase, base: Path) -> VLLMGenerator:
    """The engine, started for a LoRA (r=8) model so adapters can be served."""
    peft = get_peft_model(load(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    generator = VLLMGenerator(peft, tok, python=envs.ensure("vllm"), model_dir=base, dtype="float32",
                              max_concurrency=16, start_timeout_s=400, request_timeout_s=120, report=REPORTS.append)
    yield generator
    generator.close()


def hf(model: torch.nn.Module, tok: transformers.PreTrainedTokenizerBase) -> HFGenerator:
    return HFGenerator(model, tok)


def assert_same(got: list, want: list, atol: float = 1e-4) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [(c.text, c.finish_reason, c.prompt_index) for c in got] == [
        (c.text, c.finish_reason, c.prompt_index) for c in want]
    for a, b in zip(got, want, strict=True):
        if b.logprobs is not None:
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


def test_greedy_equals_hf_token_for_token_with_its_logprobs(gen: VLLMGenerator, tok, base: Path) -> None:
    assert isinstance(gen, Generator) and gen.version == 0 and gen.ready is not None and gen.ready.lora
    reference = hf(load(base), tok)
    assert_same(gen.generate(PROMPTS, GREEDY), reference.generate(PROMPTS, GREEDY))
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    assert_same(gen.generate(chats, GREEDY), reference.generate(chats, GREEDY))


def test_n_samples_per_prompt_are_grouped_and_reproducible_with_a_seed(gen: VLLMGenerator) -> None:
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, n=3, seed=7, logprobs=True)
    first, again = gen.generate(PROMPTS, sampling), gen.generate(PROMPTS, sampling)
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first[:3]}) > 1  # sampled, not greedy
    other = gen.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, n=3, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]
    assert all(c.logprobs is not None and len(c.logprobs) == len(c.token_ids) for c in first)


def test_a_stop_string_cuts_the_text_like_hf_and_streams_the_same_text(gen: VLLMGenerator, tok, base: Path) -> None:
    full = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16))[0]
    stop = full.text[5:7]
    sampling = SamplingParams(max_new_tokens=16, stop=(stop,), logprobs=True)
    cut = gen.generate(PROMPTS[:1], sampling)[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert_same([cut], hf(load(base), tok).generate(PROMPTS[:1], sampling))
    assert "".join(gen.stream(PROMPTS[0], sampling)) == cut.text
    assert "".join(gen.stream(PROMPTS[0], SamplingParams(max_new_tokens=16))) == full.text


def test_a_full_weight_sync_serves_the_trainers_new_weights(gen: VLLMGenerator, tok, base: Path) -> None:
    """Leaves the engine on the base weights again (version 3)."""
    trained = load(base)
    before = gen.generate(PROMPTS, GREEDY)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert gen.load_weights(1, trained.state_dict()) == 1 and gen.version == 1
    after = gen.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert_same(after, hf(trained, tok).generate(PROMPTS, GREEDY))
    one = {"model.layers.1.mlp.down_proj.weight": load(base).model.layers[1].mlp.down_proj.weight}
    assert gen.load_weights(2, one) == 2  # a subset updates only those tensors
    trained.model.layers[1].mlp.down_proj.weight.data.copy_(one["model.layers.1.mlp.down_proj.weight"])
    assert_same(gen.generate(PROMPTS, GREEDY), hf(trained, tok).generate(PROMPTS, GREEDY))
    assert gen.load_weights(3, load(base).state_dict()) == 3
    assert_same(gen.generate(PROMPTS, GREEDY), before)


def test_a_lora_adapter_sync_serves_what_the_peft_model_answers(gen: VLLMGenerator, tok, base: Path) -> None:
    """Leaves the engine serving the adapter (version 4)."""
    torch.manual_seed(1)
    peft = get_peft_model(load(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    state = get_peft_model_state_dict(peft)
    adapter = Adapter(state, peft.peft_config["default"].to_dict())
    assert gen.load_weights(4, adapter=adapter) == 4
    assert_same(gen.generate(PROMPTS, GREEDY), hf(peft, tok).generate(PROMPTS, GREEDY))
    assert [c.token_ids for c in gen.generate(PROMPTS, GREEDY)] != \
        [c.token_ids for c in hf(load(base), tok).generate(PROMPTS, GREEDY)]


def test_a_killed_engine_is_restarted_and_serves_the_same_version(gen: VLLMGenerator) -> None:
    before, restarts = gen.generate(PROMPTS, GREEDY), gen.restarts
    assert gen.ready is not None
    os.kill(gen.ready.pid, signal.SIGKILL)
    assert_same(gen.generate(PROMPTS, GREEDY), before)  # same weights and adapter after the restart
    assert gen.restarts == restarts + 1 and gen.version == 4
    assert any("exited" in line and "restarting" in line for line in REPORTS)


def test_a_hung_engine_misses_its_deadline_and_is_restarted(gen: VLLMGenerator) -> None:
    before, restarts = gen.generate(PROMPTS, GREEDY), gen.restarts
    assert gen.ready is not None
    os.kill(gen.ready.pid, signal.SIGSTOP)
    gen.request_timeout_s = 5
    try:
        started = time.monotonic()
        assert_same(gen.generate(PROMPTS, GREEDY), before)  # timed out, restarted, retried once
        assert any("did not answer the generate within its deadline" in line for line in REPORTS)
        assert gen.restarts == restarts + 1 and time.monotonic() - started < 5 + gen.start_timeout_s + 60
    finally:
        gen.request_timeout_s = 120
    gen.close()
    with pytest.raises(EngineError):
        gen.generate(PROMPTS, GREEDY)
