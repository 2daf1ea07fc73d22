"""The RL and distillation losses: GRPO and GKD by hand and against TRL 1.16, PPO against hand-worked golden
vectors and an independent loop (TRL 1.16 has no PPO), and each plugin's micro-batch normalisation."""

import math
import os

import pytest
import torch

from swiftk.contracts import Batch, ModelOutputs, shifted_labels, token_logps
from swiftk.plugins.losses.gkd import GKD, generalized_jsd
from swiftk.plugins.losses.grpo import GRPO, LOSS_TYPES, grpo_loss
from swiftk.plugins.losses.ppo import (
    PPO,
    gae,
    kl_rewards,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# After the environment: trl reads it on import.
from trl.experimental.gkd import GKDTrainer  # noqa: E402

LN2, LN3 = math.log(2), math.log(3)
F64 = torch.float64
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "data", "tiny_tokenizer")


def t(*rows: object, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def rand(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize(("loss_type", "expected"), [("grpo", 0.5), ("bnpo", 0.2), ("dr_grpo", 0.125),
                                                     ("dapo", 0.1)])
def test_grpo_on_policy_by_hand(loss_type: str, expected: float) -> None:
    """On-policy rho = 1, so loss_t = -A: rows [-1, -1, -1] (3 tokens) and [2, 2] (2 tokens) for A = [1, -2].
    grpo: mean(-1, 2) = 1/2. bnpo: (-3 + 4) / 5. dr_grpo: 1 / (2 rows * 4). dapo, N = 10 in the step: 1 / 10."""
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = t([1, 1, 1], [1, 1, 0]).bool()
    loss, metrics = grpo_loss(logps, None, None, t(1.0, -2.0), mask, beta=0.0, loss_type=loss_type,
                              max_completion_length=4, num_items_in_batch=10 if loss_type == "dapo" else None)
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()  # d rho / d logp = rho = 1 on-policy: the gradient is -A times the normalisation
    assert logps.grad[0, 0] < 0 < logps.grad[1, 0] and logps.grad[1, 2] == 0
    assert metrics["clip_ratio/region_mean"] == 0.0 and "kl" not in metrics


def test_grpo_clipping_and_kl_by_hand() -> None:
    """rho = [[3/2, 1, 1], [1/2, 1, 1]], A = [1, -2], eps 0.2 / 0.28. Token (0,0): min(3/2, 1.28) -> -1.28, clipped
    high. Token (1,0): min(-1, 0.8 * -2) = -1.6 -> 1.6, clipped low. Others -A: row sums -3.28 and 5.6.
    KL at (0,0), l_ref - l = ln 2: 2 - ln 2 - 1, times beta 1/2. bnpo: (2.32 + (1 - ln 2) / 2) / 6.
    Clip ratios: 1/6 low, 1/6 high; per row low [0, 1/3] (min 0), high [1/3, 0] (max 1/3)."""
    logps, old = torch.zeros(2, 3), t([-math.log(1.5), 0, 0], [LN2, 0, 0])
    ref = t([LN2, 0, 0], [0, 0, 0])
    loss, metrics = grpo_loss(logps, old, ref, t(1.0, -2.0), torch.ones(2, 3), beta=0.5, epsilon_high=0.28,
                              loss_type="bnpo")
    torch.testing.assert_close(loss, torch.tensor((2.32 + (1 - LN2) / 2) / 6))
    assert metrics == pytest.approx({"clip_ratio/low_mean": 1 / 6, "clip_ratio/high_mean": 1 / 6,
                                     "clip_ratio/region_mean": 1 / 3, "clip_ratio/low_min": 0.0,
                                     "clip_ratio/high_max": 1 / 3, "kl": (1 - LN2) / 6})


def test_grpo_is_weights_scale_the_surrogate_not_the_kl() -> None:
    """On-policy, A = 1: loss_t = -w_t + beta kl_t; kl = 1 - ln 2 at both tokens, w = [2, 0], beta 1/2."""
    loss, _ = grpo_loss(torch.zeros(1, 2), None, torch.full((1, 2), LN2), t(1.0), torch.ones(1, 2), beta=0.5,
                        loss_type="bnpo", is_weights=t([2.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor((-2 + 2 * 0.5 * (1 - LN2)) / 2))


def test_grpo_bad_arguments_say_what_to_set() -> None:
    zeros, ones = torch.zeros(1, 1), torch.ones(1, 1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(zeros, None, None, t(1.0), ones, beta=0.0, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_per_token_logps"):
        grpo_loss(zeros, None, None, t(1.0), ones, beta=0.04)
    with pytest.raises(ValueError, match="grpo, bnpo, dr_grpo, dapo"):
        GRPO(loss_type="cispo")
    with pytest.raises(ValueError, match="epsilon_low"):
        GRPO(epsilon_low=1.5)
    batch, outputs = rollout_batch(seed=0)
    del batch.extras["ref_logps"]
    with pytest.raises(ValueError, match=r"\[train\] beta .* the stage must provide"):
        GRPO(beta=0.04).swiftk_loss_compute(batch, outputs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Llama with the repo's character tokenizer, saved (TRL loads the reference from the path)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id)
    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_matches_trl_compute_loss(model_dir: str, loss_type: str, beta: float) -> None:
    """GRPOTrainer._compute_loss in float64, one process, no accumulation, N = the batch's completion tokens and
    no KL bias correction; our per-token log-probs from the same model, sliced like TRL's. Loss and metrics."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=model_dir, use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[],
                      per_device_train_batch_size=4, num_generations=4, loss_type=loss_type, beta=beta,
                      epsilon=0.2, epsilon_high=0.28, max_completion_length=8, use_bias_correction_kl=False)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=Dataset.from_dict({"prompt": ["ab", "cd"]}),
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model.double().train()
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, 100, (4, 3), generator=generator)
    completion_ids = torch.randint(3, 100, (4, 6), generator=generator)
    completion_mask = (torch.arange(6) < t(6, 4, 2, 5, dtype=torch.long)[:, None]).long()  # [4, 6]
    prompt_mask = torch.ones_like(prompt_ids)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                       attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits  # [4, 9, V]
    logps = logits[:, 2:-1].log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # [4, 6]
    old, ref = logps + 0.3 * rand(4, 6, seed=2), logps + 0.3 * rand(4, 6, seed=3)
    advantages = rand(4, seed=4)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum()}
    expected = trainer._compute_loss(model, inputs)
    loss, metrics = grpo_loss(logps, old, ref if beta else None, advantages, completion_mask, beta=beta,
                              epsilon_low=0.2, epsilon_high=0.28, loss_type=loss_type, max_completion_length=8)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-9)
    logged = {k: v[0] for k, v in trainer._metrics["train"].items() if k == "kl" or k.startswith("clip_ratio")}
    assert metrics == pytest.approx(logged, rel=1e-6, abs=1e-12)
    assert metrics["clip_ratio/region_mean"] > 0  # the noise on old_logps clips some tokens


def rollout_batch(seed: int, rows: int = 4, steps: int = 7, vocab: int = 11) -> tuple[Batch, ModelOutputs]:
    """A GRPO micro-batch: two prompt tokens, completions of 1 to 5 tokens, the stage's extras [B, T-1]."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (rows, steps), generator=generator)
    lengths = torch.randint(1, steps - 1, (rows,), generator=generator)
    positions = torch.arange(steps)
    labels = ids.masked_fill((positions < 2) | (positions >= 2 + lengths[:, None]), -100)  # [B, T]
    logits = torch.randn(rows, steps, vocab, generator=generator, requires_grad=True)
    noise = torch.randn(3, rows, steps - 1, generator=generator)
    extras = {"advantages": torch.randn(rows, generator=generator), "old_logps": noise[0] - 2.5,
              "ref_logps": noise[1] - 2.5, "is_weights": noise[2].abs()}
    return Batch(ids, labels, None, 0, extras=extras), ModelOutputs(logits)


def split_in_two(batch: Batch, outputs: ModelOutputs) -> list[tuple[Batch, ModelOutputs]]:
    """Two micro-batches of two rows; the step's counts (0-dim extras, num_items_in_batch) are shared."""
    halves = []
    for rows in (slice(0, 2), slice(2, None)):
        part = {k: v[rows] if v.dim() else v for k, v in batch.extras.items()}
        out = {k: v[rows] for k, v in outputs.extras.items()}
        halves.append((Batch(batch.input_ids[rows], batch.labels[rows], None, batch.num_items_in_batch,
                             extras=part), ModelOutputs(outputs.logits[rows], out)))
    return halves


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_plugin_sums_micro_batches_to_the_step_loss(loss_type: str) -> None:
    """Two micro-batches of 2 sum to the loss of the 4-row batch, which is grpo_loss on the shifted log-probs."""
    batch, outputs = rollout_batch(seed=5)
    batch.num_items_in_batch = batch.num_label_tokens
    batch.extras["num_sequences"] = torch.tensor(4)
    plugin = GRPO(beta=0.1, loss_type=loss_type, max_completion_length=6, temperature=0.7)
    whole = plugin.swiftk_loss_compute(batch, outputs)
    parts = sum(plugin.swiftk_loss_compute(*half).loss for half in split_in_two(batch, outputs))
    torch.testing.assert_close(parts, whole.loss)
    logps, mask = token_logps(outputs.logits, batch.labels, 0.7)
    expected, _ = grpo_loss(logps, batch.extras["old_logps"], batch.extras["ref_logps"], batch.extras["advantages"],
                            mask, beta=0.1, loss_type=loss_type, max_completion_length=6,
                            is_weights=batch.extras["is_weights"])
    torch.testing.assert_close(whole.loss, expected)
    assert all(isinstance(v, float) for v in whole.metrics.values())


# -------------------------------------------------------------------------------------------------------------- GKD


@pytest.mark.parametrize(("beta", "expected"), [
    (0.0, 0.75 * math.log(1.5) + 0.25 * math.log(0.5)),
    (1.0, 0.5 * math.log(2 / 3) + 0.5 * LN2),
    (0.5, 0.5 * (0.75 * math.log(6 / 5) + 0.25 * math.log(2 / 3)) + 0.25 * (math.log(4 / 5) + math.log(4 / 3))),
])
def test_jsd_by_hand(beta: float, expected: float) -> None:
    """Two-token vocabulary: student S = [1/2, 1/2] (logits 0, 0), teacher T = [3/4, 1/4] (logits ln 3, 0).
    beta 0: KL(T||S). beta 1: KL(S||T). beta 1/2: M = [5/8, 3/8], (KL(T||M) + KL(S||M)) / 2. The second
    position is unlabelled and has different logits, so it would change the mean."""
    student, teacher = t([0.0, 0.0], [5.0, 0.0]), t([LN3, 0.0], [0.0, 5.0])
    loss = generalized_jsd(student, teacher, t(7, -100, dtype=torch.long), beta=beta)
    torch.testing.assert_close(loss, torch.tensor(expected))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("labelled", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_jsd_matches_trl(beta: float, labelled: bool, temperature: float) -> None:
    """GKDTrainer.generalized_jsd_loss, batchmean. Without labels TRL divides by the leading dimension, so the
    unlabelled comparison is on [N, V] rows, where that is the number of positions."""
    student, teacher = 3 * rand(2, 5, 9, seed=6), 3 * rand(2, 5, 9, seed=7)
    labels = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(8))
    labels[0, :2] = labels[1, 4] = -100
    if not labelled:
        student, teacher, labels = student.flatten(0, 1), teacher.flatten(0, 1), None
    expected = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=temperature)
    ours = generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-12)


def test_jsd_invariants() -> None:
    """TRL's: uniform or identical logits give 0; beta 1 is F.kl_div(log T, S) batchmean; symmetric at 1/2 only."""
    a, b = rand(6, 9, seed=9), rand(6, 9, seed=10)
    assert generalized_jsd(torch.zeros(6, 9), torch.zeros(6, 9)).item() == pytest.approx(0.0, abs=1e-7)
    assert generalized_jsd(a, a, beta=0.3).item() == pytest.approx(0.0, abs=1e-12)
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.softmax(-1), reduction="batchmean")
    torch.testing.assert_close(generalized_jsd(a, b, beta=1.0), kl)
    torch.testing.assert_close(generalized_jsd(a, b, beta=0.5), generalized_jsd(b, a, beta=0.5))
    assert generalized_jsd(a, b, beta=0.1).item() != pytest.approx(generalized_jsd(b, a, beta=0.1).item())


def test_gkd_plugin_sums_micro_batches_to_the_step_mean() -> None:
    batch, outputs = rollout_batch(seed=11)
    batch.num_items_in_batch = batch.num_label_tokens
    outputs.extras["teacher_logits"] = rand(*outputs.logits.shape, seed=12, dtype=torch.float32)
    plugin = GKD(beta=0.3, temperature=1.5)
    whole = plugin.swiftk_loss_compute(batch, outputs)
    parts = sum(plugin.swiftk_loss_compute(*half).loss for half in split_in_two(batch, outputs))
    torch.testing.assert_close(parts, whole.loss)
    expected = generalized_jsd(outputs.logits, outputs.extras["teacher_logits"], shifted_labels(batch.labels),
                               beta=0.3, temperature=1.5)
    torch.testing.assert_close(whole.loss, expected)
    whole.loss.backward()
    assert outputs.logits.grad is not None and whole.metrics["jsd"] == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"beta .* \[0, 1\]"):
        GKD(beta=1.5)


# -------------------------------------------------------------------------------------------------------------- PPO


def test_masked_statistics_by_hand() -> None:
    """Valid [1, 2, 3, 6]: mean 3, squared deviations 4 + 1 + 0 + 9 = 14, unbiased var 14 / 3; per row [1.5, 4.5]."""
    values, mask = t([1.0, 2.0, 99.0], [3.0, 6.0, -99.0]), t([1, 1, 0], [1, 1, 0])
    torch.testing.assert_close(masked_mean(values, mask), torch.tensor(3.0))
    torch.testing.assert_close(masked_mean(values, mask, axis=1), t(1.5, 4.5))
    torch.testing.assert_close(masked_var(values, mask), torch.tensor(14 / 3))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), torch.tensor(3.5))
    whitened = masked_whiten(values, mask)
    torch.testing.assert_close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_var(whitened, mask), torch.tensor(1.0))
    torch.testing.assert_close(masked_whiten(values, mask, shift_mean=False), whitened + 3)


def test_kl_rewards_by_hand() -> None:
    """logp - ref = [[ln 2, 0, 0], [-ln 2, 0, *]]; k1 penalty -0.1 x; k3: e^-x - 1 + x = [-1/2 + ln 2, 1 - ln 2].
    Scores [1, 2] land on the last valid tokens (2 and 1)."""
    logps, ref, mask = t([LN2, 0, 0], [-LN2, 0, 5]), torch.zeros(2, 3), t([1, 1, 1], [1, 1, 0])
    k1 = kl_rewards(t(1.0, 2.0), logps, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(k1, t([-0.1 * LN2, 0, 1], [0.1 * LN2, 2, 0]))
    k3 = kl_rewards(t(1.0, 2.0), logps, ref, mask, kl_coef=0.1, kl_estimator="k3")
    torch.testing.assert_close(k3, t([-0.1 * (LN2 - 0.5), 0, 1], [-0.1 * (1 - LN2), 2, 0]))


def gae_loop(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """The textbook sum A_t = sum_k (gamma lam)^k delta_{t+k}, on one row's valid tokens."""
    deltas = [r + gamma * (values[i + 1] if i + 1 < len(values) else 0.0) - v
              for i, (r, v) in enumerate(zip(rewards, values, strict=True))]
    return [sum((gamma * lam) ** k * d for k, d in enumerate(deltas[i:])) for i in range(len(deltas))]


def test_gae_by_hand_and_against_a_loop() -> None:
    """Row 0, r = [0, 0, 1], V = 1/2, gamma 1, lam 1/2: delta = [0, 0, 1/2], A = [1/8, 1/4, 1/2].
    Row 1 (2 valid), r = [0, 2], V = [1, 1] (the padded 9 is ignored): delta = [0, 1], A = [1/2, 1]."""
    rewards, values = t([0.0, 0.0, 1.0], [0.0, 2.0, 7.0]), t([0.5, 0.5, 0.5], [1.0, 1.0, 9.0])
    mask = t([1, 1, 1], [1, 1, 0])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, t([0.125, 0.25, 0.5], [0.5, 1.0, 0.0]))
    torch.testing.assert_close(returns, t([0.625, 0.75, 1.0], [1.5, 2.0, 0.0]))
    r, v = rand(3, 6, seed=13), rand(3, 6, seed=14)
    lengths = [6, 3, 1]
    mask = (torch.arange(6) < torch.tensor(lengths)[:, None]).double()
    advantages, _ = gae(r, v, mask, gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths):
        expected = gae_loop(r[row, :n].tolist(), v[row, :n].tolist(), 0.9, 0.8)
        torch.testing.assert_close(advantages[row, :n], torch.tensor(expected, dtype=F64))


def test_returns_are_the_score_without_kl_discount_or_values() -> None:
    mask = t([1, 1, 1, 1], [1, 1, 0, 0])
    rewards = kl_rewards(t(3.0, -1.0), rand(2, 4, seed=15, dtype=torch.float32), torch.zeros(2, 4), mask, kl_coef=0)
    _, returns = gae(rewards, torch.zeros(2, 4), mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(returns, t([3.0, 3.0, 3.0, 3.0], [-1.0, -1.0, 0.0, 0.0]))


def test_ppo_losses_by_hand() -> None:
    """Policy: A = [1, -1], rho = [3/2, 1/2]: -A rho = [-3/2, 1/2], -A clip = [-6/5, 4/5], max -> both clipped.
    approxkl = 1/2 mean(ln^2 1.5, ln^2 2). Value: V = [1, 1/2], V_old = 0, R = [0, 1]: unclipped [1, 1/4],
    clipped V = [1/5, 1/5] -> [1/25, 16/25]; half the max: [1/2, 8/25], clipped only at the second."""
    mask = torch.ones(1, 2)
    pg, metrics = ppo_policy_loss(t([math.log(1.5), -LN2]), torch.zeros(1, 2), t([1.0, -1.0]), mask)
    torch.testing.assert_close(pg, t([-1.2, 0.8]))
    assert metrics == pytest.approx({"policy/clipfrac_avg": 1.0,
                                     "policy/approxkl_avg": 0.25 * (math.log(1.5) ** 2 + LN2**2)})
    vf, metrics = ppo_value_loss(t([1.0, 0.5]), torch.zeros(1, 2), t([0.0, 1.0]), mask)
    torch.testing.assert_close(vf, t([0.5, 0.32]))
    assert metrics == {"val/clipfrac_avg": 0.5}
    _, metrics = ppo_policy_loss(t([-1.0, -2.0]), t([-1.0, -2.0]), t([1.0, -1.0]), mask)
    assert metrics["policy/clipfrac_avg"] == 0.0  # the first mini-batch: rho = 1


def test_ppo_plugin_sums_micro_batches_to_the_step_loss() -> None:
    """(sum pg + vf_coef sum vf) / N over the shifted mask, the values' last position dropped."""
    batch, outputs = rollout_batch(seed=16)
    batch.num_items_in_batch = batch.num_label_tokens
    shape = batch.labels[:, 1:].shape
    batch.extras |= {"advantages": rand(*shape, seed=17, dtype=torch.float32),
                     "returns": rand(*shape, seed=18, dtype=torch.float32),
                     "old_values": rand(*shape, seed=19, dtype=torch.float32)}
    outputs.extras["values"] = rand(*batch.labels.shape, seed=20, dtype=torch.float32)
    plugin = PPO(vf_coef=0.5)
    whole = plugin.swiftk_loss_compute(batch, outputs)
    parts = sum(plugin.swiftk_loss_compute(*half).loss for half in split_in_two(batch, outputs))
    torch.testing.assert_close(parts, whole.loss)
    logps, mask = token_logps(outputs.logits, batch.labels)
    pg, _ = ppo_policy_loss(logps, batch.extras["old_logps"], batch.extras["advantages"], mask)
    vf, _ = ppo_value_loss(outputs.extras["values"][:, :-1], batch.extras["old_values"], batch.extras["returns"], mask)
    torch.testing.assert_close(whole.loss, (pg[mask].sum() + 0.5 * vf[mask].sum()) / mask.sum())
    assert set(whole.metrics) >= {"loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg"}
