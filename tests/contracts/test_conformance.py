"""The conformance checks pass the built-ins and name the hook of each classic plugin mistake."""

from __future__ import annotations

import pytest
import torch

import swiftk.plugins  # noqa: F401  (registers the built-ins)
from swiftk.contracts import LossResult, hookimpl, lookup
from swiftk.contracts.conformance import Finding, check, tiny_batch, tiny_outputs


@pytest.mark.parametrize("kind, name", [("loss", "cross_entropy"), ("optimizer", "adamw"), ("scheduler", "cosine")])
def test_the_builtins_conform(kind: str, name: str) -> None:
    assert check(lookup(kind, name)) == []


def test_a_config_is_built_in_and_a_bad_one_is_a_build_finding() -> None:
    assert check(lookup("loss", "cross_entropy"), {"label_smoothing": 0.1}) == []
    [finding] = check(lookup("loss", "cross_entropy"), {"label_smoothing": 2.0})
    assert finding.hook == "build" and "label_smoothing must be in [0, 1)" in finding.message


def test_tiny_inputs() -> None:
    batch = tiny_batch()
    assert batch.input_ids.shape == (2, 6) and batch.num_items_in_batch == 2 * 4 - 1  # prompt 2, one pad
    logits = tiny_outputs(batch).logits
    assert logits.shape == (2, 6, 11) and logits.requires_grad and logits.is_leaf


def loss_plugin(compute):
    class Loss:
        @hookimpl
        def swiftk_loss_compute(self, batch, outputs):
            return LossResult(compute(outputs.logits))

    return Loss()


def only(findings: list[Finding], hook: str) -> str:
    assert [f.hook for f in findings] == [hook], findings
    assert f"(hook {hook})" in str(findings[0]) and "Fix: " in str(findings[0])
    return findings[0].message


@pytest.mark.parametrize("compute, expected", [
    (lambda logits: logits[:, 0, :4].sum(0), "returned shape [4]; expected a 0-dim loss"),
    (lambda logits: logits.sum().detach(), "does not require grad"),
    (lambda logits: logits.sum() * float("nan"), "non-finite loss (nan)"),
    (lambda logits: logits.sum() * 0, "gradient w.r.t. outputs.logits is zero"),
])
def test_bad_losses(compute, expected: str) -> None:
    assert expected in only(check(loss_plugin(compute)), "swiftk_loss_compute")


class Optimizing:
    def __init__(self, optimizer: type[torch.optim.Optimizer]) -> None:
        self.optimizer = optimizer

    @hookimpl
    def swiftk_optimizer_build(self, param_groups, lr):
        return self.optimizer(param_groups, {"lr": lr})


class Idle(torch.optim.Optimizer):
    def step(self, closure=None) -> None:
        pass


class Forgetful(torch.optim.Optimizer):
    """SGD whose step size grows with a counter kept outside ``self.state``: state_dict() misses it."""

    calls = 0

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.calls += 1
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(p.grad, alpha=-group["lr"] * self.calls)


def test_an_optimizer_whose_step_does_nothing() -> None:
    message = only(check(Optimizing(Idle)), "swiftk_optimizer_build")
    assert "step() left every parameter unchanged" in message


def test_an_optimizer_whose_state_dict_does_not_round_trip() -> None:
    message = only(check(Optimizing(Forgetful)), "swiftk_optimizer_build")
    assert "state_dict() misses state" in message


def test_pluggy_validation_errors_become_findings() -> None:
    class Typos:
        @hookimpl
        def swiftk_lossx(self, batch):
            return None

        @hookimpl
        def swiftk_step_end(self, state, metrics, oops):
            return None

    findings = {f.hook: f for f in check(Typos())}
    assert set(findings) == {"swiftk_lossx", "swiftk_step_end"}
    assert "unknown hook" in findings["swiftk_lossx"].message and "swiftk_loss_compute" in findings["swiftk_lossx"].fix
    assert findings["swiftk_step_end"].message == "takes oops, which the hook does not pass"


def test_a_metric_returning_a_tensor_and_one_that_never_resets() -> None:
    class Count:
        def __init__(self, convert) -> None:
            self.seen, self.convert = 0, convert

        @hookimpl
        def swiftk_eval_batch(self, batch) -> None:
            self.seen += 1

        @hookimpl
        def swiftk_eval_end(self):
            return {"eval_batches": self.convert(self.seen)}

    assert "'eval_batches': Tensor, not a float" in only(check(Count(torch.tensor)), "swiftk_eval_end")
    assert "two identical eval passes gave" in only(check(Count(float)), "swiftk_eval_start")


def test_rewards_state_and_contract() -> None:
    class Reward:
        swiftk_contract = "9.0"

        @hookimpl
        def swiftk_reward_compute(self, completions):
            return {"length": [1.0]}

        def state_dict(self) -> dict[str, int]:
            return {"calls": 1}

    findings = {f.hook: f.message for f in check(Reward())}
    assert "returned 1 scores under 'length' for 3 completions" in findings["swiftk_reward_compute"]
    assert "has state_dict() but no load_state_dict()" in findings["load_state_dict"]
    assert "written for contract 9.0" in findings["SWIFTK_CONTRACT"]
