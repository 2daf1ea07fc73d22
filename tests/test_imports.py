"""Every module of contracts/, plugins/ and kernel/ imports, so a broken import never ships."""

import importlib
import pkgutil

import pytest

import swiftk.contracts
import swiftk.kernel
import swiftk.plugins


def modules() -> list[str]:
    names = []
    for package in (swiftk.contracts, swiftk.plugins, swiftk.kernel):
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


@pytest.mark.parametrize("name", modules())
def test_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_every_hookspec_is_documented() -> None:
    from swiftk.contracts import hookspecs

    for name in hookspecs.hook_names():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc, f"{name}: the docstring must say who calls it and when"
