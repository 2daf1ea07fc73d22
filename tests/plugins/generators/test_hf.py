"""The in-process generator on a tiny random Llama with the character tokenizer."""

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from swiftk.contracts import Generator, SamplingParams
from swiftk.kernel.tiny import build_char_tokenizer
from swiftk.plugins.generators.hf import HFGenerator, stop_ids

PROMPTS = ["12+7=", "reverse abc:", "a"]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def gen() -> HFGenerator:
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok))
    return HFGenerator(transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa"), tok)


def test_greedy_equals_one_prompt_at_a_time_model_generate(gen: HFGenerator) -> None:
    """Batched and left-padded, greedy decoding gives each prompt what a lone model.generate gives it."""
    assert isinstance(gen, Generator)
    out = gen.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    for i, prompt in enumerate(PROMPTS):
        ids = gen.tokenizer(prompt, return_tensors="pt").input_ids
        alone = gen.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stop_ids(gen.tokenizer))
        assert out[i].token_ids == alone[0, ids.shape[1] :].tolist() and out[i].prompt_index == i
        assert out[i].text == gen.tokenizer.decode(out[i].token_ids, skip_special_tokens=True)
        assert out[i].finish_reason == "length" and out[i].logprobs is None


def test_samples_are_grouped_per_prompt_and_reproducible_with_a_seed(gen: HFGenerator) -> None:
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, n=3, seed=7)
    first, again = gen.generate(PROMPTS, sampling), gen.generate(PROMPTS, sampling)
    assert [c.prompt_index for c in first] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [c.token_ids for c in first] == [c.token_ids for c in again]
    assert len({tuple(c.token_ids) for c in first[:3]}) > 1  # sampled, not greedy
    state = torch.get_rng_state()
    gen.generate(PROMPTS, sampling)
    assert torch.equal(state, torch.get_rng_state())  # the run's own random state does not move


def test_a_stop_string_cuts_the_text_and_finishes_with_stop(gen: HFGenerator) -> None:
    full = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16))[0]
    stop = full.text[5:7]
    cut = gen.generate(PROMPTS[:1], SamplingParams(max_new_tokens=16, stop=(stop,), logprobs=True))[0]
    assert cut.text == full.text[: full.text.index(stop)] and cut.finish_reason == "stop"
    assert stop in gen.tokenizer.decode(cut.token_ids) and stop not in gen.tokenizer.decode(cut.token_ids[:-1])
    assert cut.logprobs is not None and len(cut.logprobs) == len(cut.token_ids)
    assert "".join(gen.stream(PROMPTS[0], SamplingParams(max_new_tokens=16, stop=(stop,)))) == cut.text
    assert "".join(gen.stream(PROMPTS[0], SamplingParams(max_new_tokens=16))) == full.text


def test_logprobs_equal_a_re_forwards_log_softmax(gen: HFGenerator) -> None:
    """fp32, sampled at temperature 0.7: log p of each chosen token under the raw logits, as training sees it."""
    out = gen.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.7, n=2, seed=1, logprobs=True))
    for c in out:
        prompt = gen.tokenizer(PROMPTS[c.prompt_index]).input_ids
        with torch.no_grad():
            logits = gen.model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]  # [S, V]
        expected = F.log_softmax(logits.float(), -1).gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)


def test_chat_messages_are_rendered_with_the_template_and_system_prompt(gen: HFGenerator) -> None:
    messages = [{"role": "user", "content": "hi"}]
    chat = HFGenerator(gen.model, gen.tokenizer, system_prompt="be brief")
    out = chat.generate([messages], SamplingParams(max_new_tokens=8))[0]
    ids = gen.tokenizer.apply_chat_template([{"role": "system", "content": "be brief"}, *messages],
                                            add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert "<s>" not in gen.tokenizer.decode(ids["input_ids"][0])  # the template's tokens only, no BOS added
    alone = gen.model.generate(**ids, max_new_tokens=8, do_sample=False, eos_token_id=stop_ids(gen.tokenizer))
    assert out.token_ids == alone[0, ids["input_ids"].shape[1] :].tolist()


def test_load_weights_serves_the_new_version_with_the_given_tensors(gen: HFGenerator) -> None:
    other = HFGenerator(copy.deepcopy(gen.model), gen.tokenizer)
    before = other.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    head = gen.model.lm_head.weight.detach().roll(1, dims=0)  # token t now scores as t - 1 did
    assert other.version == 0 and other.load_weights(3, {"lm_head.weight": head}) == 3 == other.version
    after = other.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert after[0].token_ids[0] == before[0].token_ids[0] + 1
    with pytest.raises(KeyError, match="no tensors named nope"):
        other.load_weights(4, {"nope": head})
