"""Scoring given continuations (the Scorer capability) on a tiny random Llama with the character tokenizer, float32.

The reference is one unpadded forward per request and a log-softmax over all its positions. The vLLM test (marked
``engines``: `make test-engines`) starts its own engine on the same weights and compares it with HFGenerator.
"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

from swiftk.contracts import Adapter, Scorer
from swiftk.kernel.tiny import build_char_tokenizer
from swiftk.plugins.generators.hf import HFGenerator

TEXTS = [("12+7=", "19"), ("reverse abc:", " cba"), ("a", "b"), ("the quick brown fox", " jumps")]


def tiny(tok: transformers.PreTrainedTokenizerBase, seed: int = 0, **extra: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok), initializer_range=0.1, **extra)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def gen() -> HFGenerator:
    tok = build_char_tokenizer()
    return HFGenerator(tiny(tok), tok, batch_size=3)  # 4 requests: a full batch and a lone one


def pairs(tok: transformers.PreTrainedTokenizerBase) -> list[tuple[list[int], list[int]]]:
    return [(tok(c).input_ids, tok(x, add_special_tokens=False).input_ids) for c, x in TEXTS]


def reference(model: torch.nn.Module, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0]  # [T, V]
    logps = F.log_softmax(logits.float(), -1)[len(context) - 1 : -1]  # [S, V]: the continuation's positions
    target = torch.tensor(continuation)
    return logps.gather(1, target[:, None]).sum().item(), bool((logps.argmax(-1) == target).all())


def test_options_that_differ_in_their_last_token_share_a_sequence_and_score_alike(gen: HFGenerator) -> None:
    """A multiple-choice question's one-token options (and a longer one with the same prefix) against contexts of
    other lengths: each equals its own unpadded forward."""
    tok = gen.tokenizer
    question = tok("Q: 3+4=").input_ids
    options = [tok(x, add_special_tokens=False).input_ids for x in ("7", "8", "1", "12", "71")]
    requests = [(question, o) for o in options] + pairs(tok)
    scored = gen.score(requests)
    for s, (context, continuation) in zip(scored, requests, strict=True):
        logprob, greedy = reference(gen.model, context, continuation)
        assert s.logprob == pytest.approx(logprob, abs=1e-5) and s.greedy == greedy and s.tokens == len(continuation)


def greedy_continuation(model: torch.nn.Module, context: list[int], length: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(length):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


def test_scores_equal_an_unpadded_full_logits_computation_in_request_order(gen: HFGenerator) -> None:
    """Unequal lengths in one left-padded batch, sorted longest first inside, answered in request order."""
    assert isinstance(gen, Scorer)
    requests = pairs(gen.tokenizer)
    scored = gen.score(requests)
    assert [s.tokens for s in scored] == [len(x) for _, x in requests]
    for s, (context, continuation) in zip(scored, requests, strict=True):
        logprob, greedy = reference(gen.model, context, continuation)
        assert s.logprob == pytest.approx(logprob, abs=1e-5) and s.greedy == greedy
    gen.model.train()
    assert gen.score(requests[::-1]) == scored[::-1]
    assert gen.model.training  # eval mode while scoring (no dropout), then restored
    gen.model.eval()


def test_a_greedy_continuation_is_greedy_and_a_changed_one_is_not(gen: HFGenerator) -> None:
    context = gen.tokenizer("12+7=").input_ids
    best = greedy_continuation(gen.model, context, 3)
    worse = best[:2] + [(best[2] + 1) % len(gen.tokenizer)]
    scored = gen.score([(context, best), (context, worse)])
    assert [s.greedy for s in scored] == [True, False] and scored[0].logprob > scored[1].logprob
    assert scored[0].logprob == pytest.approx(reference(gen.model, context, best)[0], abs=1e-5)


def test_a_pair_past_the_models_positions_loses_context_on_the_left() -> None:
    tok = build_char_tokenizer()
    short = HFGenerator(tiny(tok, max_position_embeddings=16), tok)
    context, continuation = list(range(5, 35)), [7, 8, 9]
    assert short.score([(context, continuation)]) == short.score([(context[-13:], continuation)])
    with pytest.raises(ValueError, match="request 1 has an empty continuation"):
        short.score([(context, continuation), (context, [])])
    with pytest.raises(ValueError, match="at least one must be context"):
        short.score([([1], list(range(16)))])


def test_a_peft_model_scores_with_its_adapter(gen: HFGenerator) -> None:
    peft = get_peft_model(copy.deepcopy(gen.model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    requests = pairs(gen.tokenizer)
    lora = HFGenerator(peft, gen.tokenizer, batch_size=3)
    assert [s.logprob for s in lora.score(requests)] == pytest.approx([s.logprob for s in gen.score(requests)],
                                                                      abs=1e-5)  # B = 0: the base model
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    scored = lora.score(requests)
    assert all(abs(a.logprob - b.logprob) > 1e-3 for a, b in zip(scored, gen.score(requests), strict=True))
    for s, (context, continuation) in zip(scored, requests, strict=True):
        assert s.logprob == pytest.approx(reference(peft, context, continuation)[0], abs=1e-5)


@pytest.mark.engines
@pytest.mark.timeout(900)
def test_vllm_scores_agree_with_hf_on_the_base_and_under_an_adapter(tmp_path: Path) -> None:
    """Its own engine (LoRA-enabled), float32: prompt logprobs of the raw logits, 1e-3 relative; greedy flags equal."""
    from swiftk.kernel import envs
    from swiftk.plugins.generators.vllm import VLLMGenerator

    tok = build_char_tokenizer()
    torch.manual_seed(2)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True, initializer_range=0.18)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    context = tok("12+7=").input_ids
    requests = [*pairs(tok), (context, greedy_continuation(base, context, 3))]
    engine = VLLMGenerator(peft, tok, python=envs.ensure("vllm"), model_dir=tmp_path, dtype="float32",
                           max_concurrency=16, start_timeout_s=400, request_timeout_s=120)
    try:
        assert isinstance(engine, Scorer)
        want = HFGenerator(base, tok).score(requests)
        assert_same(engine.score(requests), want)
        assert want[-1].greedy
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        engine.load_weights(1, adapter=Adapter(get_peft_model_state_dict(peft), peft.peft_config["default"].to_dict()))
        tuned = HFGenerator(peft, tok).score(requests)
        assert_same(engine.score(requests), tuned)
        assert [s.logprob for s in tuned] != pytest.approx([s.logprob for s in want], rel=1e-3)
    finally:
        engine.close()


def assert_same(got: list, want: list) -> None:
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], rel=1e-3)
    assert [(s.greedy, s.tokens) for s in got] == [(s.greedy, s.tokens) for s in want]

