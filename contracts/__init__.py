"""The plugin contract: hookspecs, the types that cross them, and the registry decorators.

Plugin authors import only this package (``from swiftk.contracts import hookimpl, Batch, ...``); the kernel,
hosts and built-in plugins meet here and nowhere else.
"""

from swiftk.contracts.errors import HostDeadError, PluginError
from swiftk.contracts.markers import CONTRACT_VERSION, PROJECT_NAME, hookimpl, hookspec
from swiftk.contracts.registry import (
    PluginRegistryError,
    PluginSpec,
    lookup,
    register,
    register_callback,
    register_loss,
    register_metric,
    register_optimizer,
    register_reward,
    register_scheduler,
    registered,
)
from swiftk.contracts.types import (
    IGNORE_INDEX,
    Batch,
    LossResult,
    ModelOutputs,
    StepState,
    sequence_logps,
    shifted_labels,
    supervised,
)

__all__ = [
    "CONTRACT_VERSION",
    "IGNORE_INDEX",
    "PROJECT_NAME",
    "Batch",
    "HostDeadError",
    "LossResult",
    "ModelOutputs",
    "PluginError",
    "PluginRegistryError",
    "PluginSpec",
    "StepState",
    "hookimpl",
    "hookspec",
    "lookup",
    "register",
    "register_callback",
    "register_loss",
    "register_metric",
    "register_optimizer",
    "register_reward",
    "register_scheduler",
    "registered",
    "sequence_logps",
    "shifted_labels",
    "supervised",
]
