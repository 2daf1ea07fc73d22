"""The preference losses of issue 8: hand-worked values, parity with TRL 1.16, stability at +-50, gradients."""

import math
import os
from collections import defaultdict
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from swiftk.plugins.losses.cpo import cpo_loss
from swiftk.plugins.losses.dpo import dpo_loss
from swiftk.plugins.losses.kto import kto_loss
from swiftk.plugins.losses.orpo import log1mexp, orpo_loss
from swiftk.plugins.losses.reward import pairwise_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# After the environment: trl reads it on import.
from trl import DPOTrainer, KTOTrainer, RewardTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import log1mexp as trl_log1mexp  # noqa: E402

LN2, LN3 = math.log(2), math.log(3)
F64 = torch.float64


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------- hand-worked values


@pytest.mark.parametrize(
    ("loss_type", "eps", "expected"),
    [
        ("sigmoid", 0.0, [LN2, math.log(4 / 3)]),
        ("sigmoid", 0.25, [LN2, 0.75 * math.log(4 / 3) + 0.25 * math.log(4)]),
        ("hinge", 0.0, [1.0, 0.0]),
        ("ipo", 0.0, [25.0, (10 * LN3 - 5) ** 2]),
        ("robust", 0.25, [LN2, 2 * LN2 - 1.5 * LN3]),
    ],
)
def test_dpo_by_hand(loss_type: str, eps: float, expected: list[float]) -> None:
    """Log-ratios: chosen [0, 5 ln 3], rejected [0, -5 ln 3], so h = [0, 10 ln 3] and beta h = [0, ln 3] at beta 0.1,
    where s(0) = 1/2 and s(ln 3) = 3/4, s(-ln 3) = 1/4.
    sigmoid: -log s = [ln 2, ln 4/3]; eps 1/4 adds 1/4 (-log s(-beta h) + log s(beta h)):
    [ln 2, 3/4 ln 4/3 + 1/4 ln 4].  hinge: max(0, 1 - [0, 1.0986]) = [1, 0].
    ipo: (h - 1/(2 beta))^2 = [(0 - 5)^2, (10 ln 3 - 5)^2].
    robust, eps 1/4: ([3/4 ln 2, 3/4 ln 4/3] - 1/4 [ln 2, ln 4]) / (1/2) = [ln 2, 3/2 ln 4/3 - 1/2 ln 4]
    = [ln 2, 2 ln 2 - 3/2 ln 3]."""
    chosen, rejected = t(-1.0, -2.0), t(-4.0, -3.0)
    ref_chosen, ref_rejected = t(-1.0, -2.0 - 5 * LN3), t(-4.0, -3.0 + 5 * LN3)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=0.1, loss_type=loss_type, label_smoothing=eps
    )
    torch.testing.assert_close(losses, t(*expected))
    torch.testing.assert_close(chosen_rewards, t(0.0, LN3 / 2))
    torch.testing.assert_close(rejected_rewards, t(0.0, -LN3 / 2))


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        ("sigmoid", [LN2, math.log(4 / 3)]),
        ("hinge", [1.0, 0.0]),
        ("ipo", [25.0, (10 * LN3 - 5) ** 2]),
        ("simpo", [math.log(4), LN2]),
    ],
)
def test_cpo_and_simpo_by_hand(loss_type: str, expected: list[float]) -> None:
    """No reference: h = chosen - rejected = [0, 10 ln 3], beta h = [0, ln 3] at beta 0.1; sigmoid, hinge and ipo
    as for DPO. simpo, gamma ln 3: beta h - gamma = [-ln 3, 0], -log s = [ln 4, ln 2]. Rewards: 0.1 * logps."""
    chosen, rejected = t(-2.0, -1.0), t(-2.0, -1.0 - 10 * LN3)
    losses, chosen_rewards, rejected_rewards = cpo_loss(
        chosen, rejected, beta=0.1, loss_type=loss_type, simpo_gamma=LN3
    )
    torch.testing.assert_close(losses, t(*expected))
    torch.testing.assert_close(chosen_rewards, t(-0.2, -0.1))
    torch.testing.assert_close(rejected_rewards, t(-0.2, -0.1 - LN3))


def test_kto_by_hand() -> None:
    """beta 1/2. Mismatched log-ratios [-2 + 3, -3 + 3] = [1, 0]: z0 = 1/2.
    Desirable: r = -1 + 3/2 + 2 ln 3 = 1/2 + 2 ln 3, beta (r - z0) = ln 3, 1 - s = 1/4, times lambda_D 2 = 1/2.
    Undesirable: r = -4 + 9/2 = 1/2, beta (z0 - r) = 0, 1 - s = 1/2, times lambda_U 3 = 3/2.
    Rewards beta r: [1/4 + ln 3] and [1/4]."""
    logps, ref_logps = (t(-1.0), t(-4.0), t(-2.0, -3.0)), (t(-1.5 - 2 * LN3), t(-4.5), t(-3.0, -3.0))
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        *logps, *ref_logps, beta=0.5, desirable_weight=2.0, undesirable_weight=3.0
    )
    torch.testing.assert_close(losses, t(0.5, 1.5))
    torch.testing.assert_close(chosen_rewards, t(0.25 + LN3))
    torch.testing.assert_close(rejected_rewards, t(0.25))
    torch.testing.assert_close(kl, torch.tensor(0.5))


def test_kto_clamps_a_negative_kl_and_takes_an_empty_side() -> None:
    """No desirable rows; mismatched log-ratio -3 + 2 = -1, clamped to z0 = 0. Undesirable r = -2 ln 3 at beta 1/2:
    beta (z0 - r) = ln 3, 1 - s = 1/4; reward beta r = -ln 3."""
    empty = t()
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        empty, t(-3.0 - 2 * LN3), t(-3.0), empty, t(-3.0), t(-2.0), beta=0.5
    )
    torch.testing.assert_close(losses, t(0.25))
    assert chosen_rewards.shape == (0,) and kl.item() == 0.0
    torch.testing.assert_close(rejected_rewards, t(-LN3))


def test_orpo_by_hand() -> None:
    """Per-token means l = log P. Pair 0: P = 1/2 (odds 1) vs 1/4 (odds 1/3): log_odds = 0 + ln 3, s = 3/4.
    Pair 1: P = 1/4 (odds 1/3) vs 3/4 (odds 3): log_odds = -2 ln 3, s = 1/(1 + 9) = 1/10.
    Penalty -0.1 log s = [0.1 ln 4/3, 0.1 ln 10]; log_odds_ratio = mean log s = (ln 3/4 - ln 10) / 2;
    log_odds_chosen = mean log_odds = -ln 3 / 2."""
    chosen, rejected = t(-LN2, -2 * LN2), t(-2 * LN2, math.log(3 / 4))
    penalty, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = orpo_loss(chosen, rejected, beta=0.1)
    torch.testing.assert_close(penalty, t(0.1 * math.log(4 / 3), 0.1 * math.log(10)))
    torch.testing.assert_close(chosen_rewards, 0.1 * chosen)
    torch.testing.assert_close(rejected_rewards, 0.1 * rejected)
    torch.testing.assert_close(log_odds_ratio, torch.tensor((math.log(3 / 4) - math.log(10)) / 2))
    torch.testing.assert_close(log_odds_chosen, torch.tensor(-LN3 / 2))


def test_log1mexp_keeps_its_precision_at_both_ends() -> None:
    """float32: log1p(-exp(-1e-10)) is log1p(-1) = -inf, the exact value is log(1e-10); at -50, -exp(-50)."""
    torch.testing.assert_close(log1mexp(t(-1e-10, -LN2, -50.0)), t(math.log(1e-10), -LN2, -math.exp(-50)))


def test_pairwise_by_hand() -> None:
    """Differences c - r = [0, ln 3]: -log s = [ln 2, ln 4/3], mean ln(8/3) / 2. A margin [0, ln 3] makes both
    differences 0 (ln 2 each); centring 0.01 adds 0.01 * mean([1 + 1, ln 3 + 0]^2) = 0.01 (4 + ln^2 3) / 2."""
    chosen, rejected = t(1.0, LN3), t(1.0, 0.0)
    torch.testing.assert_close(pairwise_loss(chosen, rejected), torch.tensor(math.log(8 / 3) / 2))
    centred = pairwise_loss(chosen, rejected, margin=t(0.0, LN3), center_rewards_coefficient=0.01)
    torch.testing.assert_close(centred, torch.tensor(LN2 + 0.01 * (4 + LN3**2) / 2))


def test_unknown_loss_type_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, robust"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss_type="simpo")
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, simpo"):
        cpo_loss(t(0.0), t(0.0), loss_type="robust")


# -------------------------------------------------------------------------------------------- parity with TRL 1.16
# TRL computes these inside trainer methods. Each is called on a trainer made with object.__new__ (no model, no
# data), given only the attributes the method reads; DPO's and KTO's run the model inside, so they get a stand-in.


def trl_trainer(cls: type, **attributes: object) -> object:
    trainer = object.__new__(cls)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    metrics: defaultdict[str, defaultdict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    trainer.__dict__.update(accelerator=accelerator, model=SimpleNamespace(training=True), _metrics=metrics)
    trainer.__dict__.update(_total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, precompute_ref_logps=True)
    trainer.__dict__.update(attributes)
    return trainer


def fake_lm(input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
    """TRL's fused-LM-head model output; the per-token log-probs are carried in ``input_ids`` (see token_rows)."""
    zeros = torch.zeros_like(input_ids[:, 1:])
    return SimpleNamespace(log_probs=input_ids[:, 1:], entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def token_rows(logps: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
    """One prompt token, then a completion of ``lengths`` tokens whose log-probs sum to ``logps``, then padding."""
    position = torch.arange(int(lengths.max()) + 1)
    mask = (position >= 1) & (position <= lengths[:, None])  # [N, T]
    ids = mask * (logps / lengths)[:, None]  # [N, T]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask.long()}


def random_logps(*shape: int, seed: int, scale: float = 30.0) -> torch.Tensor:
    return -scale * torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize(("loss_type", "eps"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_matches_trl_compute_loss(loss_type: str, eps: float) -> None:
    """DPOTrainer._compute_loss on summed log-probs; for ipo TRL divides by the completion lengths itself, so ours
    gets the per-token means. TRL returns the batch mean, and logs rewards (on sums, even for ipo)."""
    logps, refs = random_logps(2, 6, seed=0), random_logps(2, 6, seed=1)  # [chosen|rejected, B]
    lengths = torch.randint(1, 6, (2, 6), generator=torch.Generator().manual_seed(2))
    config = {"loss_types": [loss_type], "loss_weights": [1.0], "beta": 0.1, "label_smoothing": eps}
    trainer = trl_trainer(DPOTrainer, ld_alpha=None, f_divergence_type="reverse_kl", use_weighting=False, **config)
    inputs = token_rows(logps.flatten(), lengths.flatten())
    inputs |= {"ref_chosen_logps": refs[0], "ref_rejected_logps": refs[1]}
    expected = trainer._compute_loss(fake_lm, inputs, return_outputs=False)
    scale = lengths if loss_type == "ipo" else 1
    losses, chosen_rewards, _ = dpo_loss(*(logps / scale), *(refs / scale), loss_type=loss_type, label_smoothing=eps)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-6, atol=1e-9)
    if loss_type != "ipo":
        assert chosen_rewards.mean().item() == pytest.approx(trainer._metrics["train"]["rewards/chosen"][0], rel=1e-6)


def test_conservative_dpo_matches_trl_cpo_sigmoid() -> None:
    """TRL 1.16's DPO sigmoid no longer reads label_smoothing; its CPO sigmoid still has the conservative form,
    -(1 - eps) log s(beta h) - eps log s(-beta h), which on the log-ratios is conservative DPO."""
    logps, refs = random_logps(2, 8, seed=3), random_logps(2, 8, seed=4)
    trainer = trl_trainer(CPOTrainer, beta=0.1, label_smoothing=0.2, loss_type="sigmoid", alpha=0.0)
    expected, _, _ = trainer.cpo_loss(logps[0] - refs[0], logps[1] - refs[1])
    torch.testing.assert_close(dpo_loss(*logps, *refs, label_smoothing=0.2)[0], expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kl_shift", [2.0, -2.0])  # the KL estimate positive, and negative (clamped)
def test_kto_matches_trl_compute_loss(kl_shift: float) -> None:
    """KTOTrainer._compute_loss: TRL returns nanmean of [desirable losses, undesirable losses] and logs kl."""
    logps, refs = random_logps(10, seed=5), random_logps(10, seed=6)
    ref_kl = random_logps(10, seed=7)
    kl_logps = ref_kl + kl_shift + torch.randn(10, generator=torch.Generator().manual_seed(8), dtype=F64)
    label = torch.arange(10) % 3 != 0  # 6 desirable, 4 undesirable
    trainer = trl_trainer(
        KTOTrainer, calculate_KL=True, loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.5
    )
    ones = torch.ones(10, dtype=torch.long)
    inputs = token_rows(logps, ones) | {f"KL_{k}": v for k, v in token_rows(kl_logps, ones).items()}
    inputs |= {"label": label, "ref_logps": refs, "ref_KL_logps": ref_kl}
    expected = trainer._compute_loss(fake_lm, inputs, return_outputs=False)
    losses, chosen_rewards, rejected_rewards, kl = kto_loss(
        logps[label], logps[~label], kl_logps, refs[label], refs[~label], ref_kl, undesirable_weight=1.5
    )
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-6, atol=1e-9)
    logged = trainer._metrics["train"]
    assert kl.item() == pytest.approx(logged["kl"][0], rel=1e-6, abs=1e-12)
    assert chosen_rewards.mean().item() == pytest.approx(logged["rewards/chosen"][0], rel=1e-6)
    assert rejected_rewards.mean().item() == pytest.approx(logged["rewards/rejected"][0], rel=1e-6)


@pytest.mark.parametrize(("loss_type", "eps"), [("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0), ("simpo", 0.1)])
def test_cpo_matches_trl_cpo_loss(loss_type: str, eps: float) -> None:
    """CPOTrainer.cpo_loss, per pair; simpo_gamma is the same absolute margin in both (TRL: beta (h - gamma/beta))."""
    chosen, rejected = random_logps(8, seed=9, scale=3.0), random_logps(8, seed=10, scale=3.0)
    config = {"beta": 0.7, "label_smoothing": eps, "loss_type": loss_type, "simpo_gamma": 0.8}
    expected = trl_trainer(CPOTrainer, alpha=0.0, **config).cpo_loss(chosen, rejected)
    for ours, theirs in zip(cpo_loss(chosen, rejected, **config), expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_orpo_matches_trl_odds_ratio_loss() -> None:
    """ORPOTrainer.odds_ratio_loss casts the log-probs to float32 and returns +beta log s (it subtracts it from the
    NLL), so the comparison is in float32 and the penalty is its negative. Its log1mexp keeps the dtype: float64."""
    chosen, rejected = random_logps(8, seed=11, scale=4.0).float(), random_logps(8, seed=12, scale=4.0).float()
    losses, *expected = trl_trainer(ORPOTrainer, beta=0.25).odds_ratio_loss(chosen, rejected)
    penalty, *ours = orpo_loss(chosen, rejected, beta=0.25)
    torch.testing.assert_close(penalty, -losses)
    for mine, theirs in zip(ours, expected, strict=True):
        torch.testing.assert_close(mine, theirs)
    x = -torch.logspace(-12, 2, 50, dtype=F64)
    torch.testing.assert_close(log1mexp(x), trl_log1mexp(x), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("margin", "coefficient"), [(False, None), (True, None), (True, 0.01)])
def test_pairwise_matches_trl_reward_trainer(margin: bool, coefficient: float | None) -> None:
    """RewardTrainer.compute_loss on a stand-in model whose logits are the rewards, value and gradient."""
    chosen, rejected = random_logps(8, seed=13, scale=6.0), random_logps(8, seed=14, scale=6.0)
    chosen.requires_grad_(True)
    margins = torch.rand(8, generator=torch.Generator().manual_seed(15), dtype=F64) if margin else None
    trainer = trl_trainer(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=coefficient))
    inputs = {"attention_mask": torch.ones(16, 3)} | ({"margin": margins} if margin else {})
    model = lambda **_: SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # noqa: E731
    expected = trainer.compute_loss(model, inputs)
    ours = pairwise_loss(chosen, rejected, margin=margins, center_rewards_coefficient=coefficient)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(*(torch.autograd.grad(loss, chosen)[0] for loss in (ours, expected)))


# -------------------------------------------------------------------------------- stability, gradients, detaching
# Each case maps (chosen, rejected) [B] to its losses; references 0, KL constant.


def kto_case(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    kl, ref_kl = torch.tensor([-1.0, -2.0], dtype=c.dtype), torch.tensor([-2.0, -2.0], dtype=c.dtype)
    return kto_loss(c, r, kl, torch.zeros_like(c), torch.zeros_like(r), ref_kl, beta=1.0)[0]


def dpo_case(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    eps = 0.1 if kind in ("sigmoid", "robust") else 0.0

    def losses(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(c)
        return dpo_loss(c, r, zero, zero, beta=1.0, loss_type=kind, label_smoothing=eps)[0]

    return losses


CASES = {
    **{f"dpo_{kind}": dpo_case(kind) for kind in ("sigmoid", "hinge", "ipo", "robust")},
    **{
        f"cpo_{kind}": lambda c, r, kind=kind: cpo_loss(c, r, beta=1.0, loss_type=kind)[0]
        for kind in ("sigmoid", "hinge", "ipo", "simpo")
    },
    "kto": kto_case,
    "orpo": lambda c, r: orpo_loss(c, r, beta=1.0)[0],
    "pairwise": lambda c, r: pairwise_loss(c, r, margin=torch.ones_like(c), center_rewards_coefficient=0.01),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", CASES)
def test_finite_at_log_prob_differences_of_50(name: str, dtype: torch.dtype) -> None:
    """Differences +50 and -50 at beta 1, with a log-prob of exactly 0 (ORPO's log(1 - exp(0)) = -inf)."""
    chosen = torch.tensor([0.0, -50.0], dtype=dtype, requires_grad=True)
    rejected = torch.tensor([-50.0, 0.0], dtype=dtype, requires_grad=True)
    losses = CASES[name](chosen, rejected)
    losses.sum().backward()
    assert losses.dtype == dtype and torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name: str) -> None:
    """Away from the hinge's kink (1 - h = 0.2 and 2.1) and ORPO's clamp at 0."""
    chosen = torch.tensor([-0.3, -1.7], dtype=F64, requires_grad=True)
    rejected = torch.tensor([-1.1, -0.6], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(CASES[name], (chosen, rejected))


def test_rewards_and_kl_are_detached() -> None:
    chosen, rejected = (torch.tensor([-1.0, -2.0], requires_grad=True) for _ in range(2))
    zeros = torch.zeros(2)
    rewards = [
        *dpo_loss(chosen, rejected, zeros, zeros)[1:],
        *cpo_loss(chosen, rejected)[1:],
        *orpo_loss(chosen, rejected)[1:],
    ]
    *_, kl = kto_loss(chosen, rejected, chosen + 3, zeros, zeros, zeros)
    rewards += kto_loss(chosen, rejected, chosen, zeros, zeros, zeros)[1:]
    assert all(reward.grad_fn is None and not reward.requires_grad for reward in rewards)
    assert kl.grad_fn is None and kl.item() == pytest.approx(1.5)
    assert rewards[-1].item() == 0.0  # the clamped kl: mean [-1, -2] < 0
