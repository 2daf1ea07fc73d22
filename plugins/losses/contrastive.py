"""Contrastive image-text losses for dual encoders: CLIP's symmetric InfoNCE (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", fig. 3; InfoNCE: van den Oord et al. 2018) and
SigLIP's pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", alg. 1).

A micro-batch holds B matched pairs (image i, caption i). The stage (``[train] stage = "clip"``) gives the cosine
similarities ``C`` of the normalised embeddings as ``outputs.logits`` ``[B, B]`` (row i: image i against every
caption), the model's learnable log-temperature s as ``extras["logit_scale"]`` and, for SigLIP, its learnable
bias b as ``extras["logit_bias"]``:

    z = min(exp(s), max_scale) * C + b                     # [B, B]; max_scale = 100 as in CLIP
    clip_contrastive   l_i = [CE(z[i, :], i) + CE(z[:, i], i)] / 2     image->text over row i, text->image over
                                                                        column i
    siglip             l_i = -sum_j log s(y_ij z_ij),  y_ij = +1 if i == j else -1

CLIP clips the temperature at 100 so that the logits cannot grow without bound (here with ``min``: past the cap
s gets no gradient); CLIP ignores b (a constant shift of a softmax row changes nothing). SigLIP's loss needs no
normalisation over the batch, so each pair term is independent.

Normalisation: a micro-batch's loss is ``sum_i l_i / num_items_in_batch``, which counts the step's *pairs* (the
stage sets ``extras["num_pairs"]``), so the step's loss is the mean over all its pairs however the step is split.
The negatives, however, are those of the micro-batch only: with ``grad_accum`` > 1 or several ranks each pair is
contrasted with the ``batch_size - 1`` others of its own micro-batch (no gather across ranks, no gradient cache),
so the contrastive batch is ``[train] batch_size``, not the step's sample count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftk.contracts import Batch, LossResult, ModelOutputs, hookimpl, register_loss


def temperature(logit_scale: torch.Tensor, max_scale: float | None = 100.0) -> torch.Tensor:
    """``min(exp(s), max_scale)``, 0-dim float32: what the similarities are multiplied by."""
    scale = logit_scale.float().reshape(()).exp()
    return scale if max_scale is None else scale.clamp(max=max_scale)


def scaled_logits(similarity: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None,
                  max_scale: float | None = 100.0) -> torch.Tensor:
    """``min(exp(s), max_scale) * C (+ b)`` in float32: cosine similarities ``[B, B]`` to logits ``[B, B]``."""
    logits = temperature(logit_scale, max_scale) * similarity.float()
    return logits if logit_bias is None else logits + logit_bias.float().reshape(())


def clip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-pair symmetric InfoNCE ``[B]`` of logits ``[B, B]`` whose diagonal holds the matched pairs."""
    targets = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, targets, reduction="none")  # [B]: row i, caption i is right
    text_to_image = F.cross_entropy(logits.T, targets, reduction="none")  # [B]: column i, image i is right
    return (image_to_text + text_to_image) / 2


def siglip_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-image sigmoid loss ``[B]``: every (image, caption) cell is a binary match / no-match decision."""
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1  # [B, B]: +1 diagonal
    return -F.logsigmoid(signs * logits).sum(dim=1)


class Contrastive:
    """Shared hook: the stage's similarities and temperature to the per-pair loss, summed over the step's pairs."""

    uses_bias = False

    def __init__(self, max_scale: float | None = 100.0) -> None:
        if max_scale is not None and max_scale <= 0:
            raise ValueError(f"max_scale caps exp(logit_scale), so it must be > 0 (or None: no cap), got {max_scale}")
        self.max_scale = max_scale

    def per_pair(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @hookimpl
    def swiftk_loss_compute(self, batch: Batch, outputs: ModelOutputs) -> LossResult:
        if "logit_scale" not in outputs.extras:
            raise ValueError("a contrastive loss reads extras['logit_scale'] beside the [B, B] similarities in "
                             "logits: train it with [train] stage = 'clip'")
        similarity = outputs.logits  # [B, B]: image i against caption j
        bias = outputs.extras.get("logit_bias") if self.uses_bias else None
        logits = scaled_logits(similarity, outputs.extras["logit_scale"], bias, self.max_scale)  # [B, B]
        losses = self.per_pair(logits)  # [B]
        with torch.no_grad():
            targets = torch.arange(logits.shape[0], device=logits.device)
            metrics = {"contrastive/scale": float(temperature(outputs.extras["logit_scale"], self.max_scale)),
                       "contrastive/i2t_accuracy": float((logits.argmax(1) == targets).float().mean()),
                       "contrastive/t2i_accuracy": float((logits.argmax(0) == targets).float().mean())}
        return LossResult(losses.sum() / batch.num_items_in_batch, metrics)


@register_loss("clip_contrastive")
class ClipContrastive(Contrastive):
    """CLIP's symmetric InfoNCE over the in-batch similarity matrix; ``max_scale`` caps the temperature."""

    def per_pair(self, logits: torch.Tensor) -> torch.Tensor:
        return clip_loss(logits)


@register_loss("siglip")
class SigLIP(Contrastive):
    """SigLIP's sigmoid loss, with the model's learnable bias (``extras["logit_bias"]``; 0 when it has none)."""

    uses_bias = True

    def __init__(self, max_scale: float | None = None) -> None:
        super().__init__(max_scale)

    def per_pair(self, logits: torch.Tensor) -> torch.Tensor:
        return siglip_loss(logits)
