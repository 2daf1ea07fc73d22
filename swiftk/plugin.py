"""The plugin author's import: ``from swiftk.plugin import register_loss, hookimpl, ...``.

The same names as ``swiftk.contracts`` (which this re-exports), under the module path people know from
ms-swift's ``swift.plugin``.
"""

from swiftk.contracts import (
    CONTRACT_VERSION,
    IGNORE_INDEX,
    Batch,
    HostDeadError,
    LossResult,
    ModelOutputs,
    PluginError,
    StepState,
    hookimpl,
    register_callback,
    register_loss,
    register_metric,
    register_optimizer,
    register_reward,
    register_scheduler,
)

__all__ = [
    "CONTRACT_VERSION",
    "IGNORE_INDEX",
    "Batch",
    "HostDeadError",
    "LossResult",
    "ModelOutputs",
    "PluginError",
    "StepState",
    "hookimpl",
    "register_callback",
    "register_loss",
    "register_metric",
    "register_optimizer",
    "register_reward",
    "register_scheduler",
]
