"""The plugin contract: hookspecs, the types that cross them, and the registry decorators.

Plugin authors import only this package (``from swiftk.contracts import hookimpl, Batch, ...``); the kernel,
hosts and built-in plugins meet here and nowhere else.
"""

from swiftk.contracts.errors import HostDeadError, PluginError
from swiftk.contracts.evals import EvalTask, build_eval_task, register_eval_task
from swiftk.contracts.generation import (
    Adapter,
    Completion,
    Generator,
    Message,
    SamplingParams,
    Scored,
    Scorer,
    build_generator,
    register_generator,
)
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
from swiftk.contracts.rewards import Outcome, PauseRun, RewardColumn, Scores
from swiftk.contracts.stages import LEARN, LossChoice, RewardChoice, Stage, StageConfig, register_stage
from swiftk.contracts.types import (
    IGNORE_INDEX,
    Batch,
    LossResult,
    ModelOutputs,
    StepState,
    sequence_logps,
    shifted_labels,
    supervised,
    token_cross_entropy,
    token_logps,
)

__all__ = [
    "CONTRACT_VERSION",
    "IGNORE_INDEX",
    "LEARN",
    "PROJECT_NAME",
    "Adapter",
    "Batch",
    "Completion",
    "EvalTask",
    "Generator",
    "HostDeadError",
    "LossChoice",
    "LossResult",
    "Message",
    "ModelOutputs",
    "Outcome",
    "PauseRun",
    "PluginError",
    "PluginRegistryError",
    "PluginSpec",
    "RewardChoice",
    "RewardColumn",
    "SamplingParams",
    "Scored",
    "Scorer",
    "Scores",
    "Stage",
    "StageConfig",
    "StepState",
    "build_eval_task",
    "build_generator",
    "hookimpl",
    "hookspec",
    "lookup",
    "register",
    "register_callback",
    "register_eval_task",
    "register_generator",
    "register_loss",
    "register_metric",
    "register_optimizer",
    "register_reward",
    "register_scheduler",
    "register_stage",
    "registered",
    "sequence_logps",
    "shifted_labels",
    "supervised",
    "token_cross_entropy",
    "token_logps",
]
