"""Fused cross-entropy and focal loss in C++ (``loss_type = "native_cross_entropy"`` / ``"native_focal"``).

    cross-entropy    L_i = lse(x_i) - x_{i,t}
    focal            L_i = -alpha (1 - p_t)^gamma log p_t        (Lin et al. 2017, eq. 5)

native/fused_ce.cpp computes each row's log-sum-exp and loss in one parallel pass and, in backward, the
gradient ``c_i (softmax(x_i) - onehot(t))`` in one more, never materialising ``log_softmax`` ([N, V] floats
that ``F.cross_entropy`` writes and reads back) nor a float32 copy of bfloat16 logits. Positions that are not
supervised (label -100 after the causal shift) cost one comparison. The step's loss is the token sum divided
by the step's label count, as for ``cross_entropy``. CPU tensors; compiled on first use (cached).
"""

from __future__ import annotations

from swiftk.contracts import register_loss
from swiftk.native import NativePlugin, NativeTokenLoss, builtin


@register_loss("native_cross_entropy")
class NativeCrossEntropy(NativeTokenLoss):
    """Next-token cross-entropy, fused forward and backward over the logits."""

    def __init__(self) -> None:
        super().__init__(gamma=0.0, alpha=1.0)

    @classmethod
    def load_plugin(cls) -> NativePlugin:
        return builtin("fused_ce")


@register_loss("native_focal")
class NativeFocal(NativeTokenLoss):
    """Focal loss ``-alpha (1 - p_t)^gamma log p_t`` per supervised token, fused like native_cross_entropy."""

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0) -> None:
        if alpha <= 0 or gamma < 0:
            raise ValueError(f"native_focal needs alpha > 0 and gamma >= 0, got alpha={alpha}, gamma={gamma}")
        super().__init__(alpha=alpha, gamma=gamma)

    @classmethod
    def load_plugin(cls) -> NativePlugin:
        return builtin("fused_ce")
