"""The pluggy markers, the traits a hookspec declares, and the contract version every plugin and host is
checked against."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pluggy

PROJECT_NAME = "swiftk"

# Semantic version of the hook contract. Minor: hooks or optional arguments added (old plugins keep
# working, because the kernel calls hooks with keywords and an implementation may take a subset).
# Major: a hook removed or its meaning changed. Patch: what a plugin sees is unchanged, what crosses to a host
# is not (0.1.1: model outputs as hidden states and the head, not logits; kept segments), so a host of another
# patch is refused at the handshake.
CONTRACT_VERSION = "0.1.1"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

TRAITS_ATTR = f"{PROJECT_NAME}_traits"
Spec = TypeVar("Spec", bound=Callable[..., object])


@dataclass(frozen=True)
class HookTraits:
    """Where a hook may run and what its result is, as its hookspec declares it (``@remote``).

    A spec without the marker runs in the kernel only: its arguments are live kernel objects (the model, the
    optimizer) that cannot cross a process boundary."""

    remote: bool = False  # may run in a plugin host: takes and returns only contracts types, tensors, plain data
    differentiable: bool = False  # its result is a loss: a host returns it with the gradient w.r.t. its inputs


def remote(*, differentiable: bool = False) -> Callable[[Spec], Spec]:
    """Mark a hookspec as able to run in a plugin host; ``differentiable``: its result is a loss, which a host
    returns together with its gradient with respect to the tensors it was given. Plugin hosts forward exactly
    the hooks so marked (``hookspecs.remote_hooks``)."""
    traits = HookTraits(remote=True, differentiable=differentiable)

    def mark(spec: Spec) -> Spec:
        setattr(spec, TRAITS_ATTR, traits)
        return spec

    return mark


def traits_of(spec: object) -> HookTraits:
    """The traits ``spec`` declares (an unmarked spec: in-process only)."""
    traits = getattr(spec, TRAITS_ATTR, None)
    return traits if isinstance(traits, HookTraits) else HookTraits()
