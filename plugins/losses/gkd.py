"""Generalized Knowledge Distillation (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning
from Self-Generated Mistakes", eq. 1): the generalized Jensen-Shannon divergence between the teacher's and the
student's next-token distributions, per position.

With T and S the teacher's and student's softmax(logits / tau) over the vocabulary and the mixture

    M = beta T + (1 - beta) S                       (in log space: logsumexp(log T + log beta, log S + log(1-beta)))
    JSD_beta(T || S) = beta KL(T || M) + (1 - beta) KL(S || M)

beta = 0 is taken to mean KL(T || S), the forward KL of supervised distillation, and beta = 1 KL(S || T), the
mode-seeking reverse KL; both limits are computed exactly, not through M (where they would vanish). The loss sums
over the vocabulary and averages over the scored tokens, as TRL's ``GKDTrainer.generalized_jsd_loss`` with
``reduction="batchmean"``.

Which completions are scored (dataset, teacher- or student-generated: the paper's lambda) is the stage's choice;
this file only sees the student's and teacher's logits on the same tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftk.contracts import IGNORE_INDEX, Batch, LossResult, ModelOutputs, hookimpl, register_loss, shifted_labels


def _check(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gkd: beta interpolates teacher and student, it must be in [0, 1], got {beta}")
    if temperature <= 0:
        raise ValueError(f"gkd: temperature must be > 0, got {temperature}")


def token_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
              temperature: float = 1.0) -> torch.Tensor:
    """JSD_beta(T || S) per position: logits ``[..., V]`` -> ``[...]``."""
    _check(beta, temperature)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)  # [..., V]
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # KL(T || S)
    if beta == 1:
        return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1)  # KL(S || T)
    weights = torch.tensor([beta, 1 - beta], dtype=log_s.dtype, device=log_s.device).log()
    log_m = torch.logsumexp(torch.stack([log_t + weights[0], log_s + weights[1]]), dim=0)  # [..., V]
    kl_teacher = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)  # KL(T || M)
    kl_student = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)  # KL(S || M)
    return beta * kl_teacher + (1 - beta) * kl_student


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                    *, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """0-dim mean of JSD_beta over the scored positions of logits ``[..., V]``.

    ``labels`` ``[...]`` are aligned with the logits, as TRL's are (position t is scored iff ``labels[t] != -100``;
    for unshifted batch labels pass ``shifted_labels(labels)``); None scores every position. Unlike TRL, which
    divides by the leading dimension when no labels are given, the mean is always over positions."""
    jsd = token_jsd(student_logits, teacher_logits, beta=beta, temperature=temperature)  # [...]
    if labels is not None:
        jsd = jsd[labels != IGNORE_INDEX]  # [N]
    return jsd.sum() / max(jsd.numel(), 1)


@register_loss("gkd")
class GKD:
    """Distil ``outputs.extras["teacher_logits"]`` [B, T, V] into the student's logits on the labelled tokens;
    summed over them and divided by the step's token count, so the micro-batch losses sum to the step's mean."""

    def __init__(self, beta: float = 0.5, temperature: float = 1.0) -> None:
        _check(beta, temperature)
        self.beta, self.temperature = beta, temperature

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        if "teacher_logits" not in outputs.extras:
            raise ValueError("loss 'gkd': the model outputs have no extras['teacher_logits']; the stage must run the "
                             "teacher on the same tokens")
        scored = shifted_labels(batch.labels) != IGNORE_INDEX  # [B, T], aligned with the logits
        teacher = outputs.extras["teacher_logits"][scored].detach().float()  # [N, V]
        jsd = token_jsd(outputs.logits[scored].float(), teacher, beta=self.beta, temperature=self.temperature)  # [N]
        metrics = {"jsd": jsd.detach().mean().item() if jsd.numel() else 0.0}
        return LossResult(jsd.sum() / max(batch.num_items_in_batch, 1), metrics)
