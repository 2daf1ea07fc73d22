"""The plugin author's import: ``from swiftk.plugin import register_loss, hookimpl, ...``.

Exactly ``swiftk.contracts``, under the module path people know from ms-swift's ``swift.plugin``.
"""

from swiftk.contracts import *  # noqa: F403
from swiftk.contracts import __all__  # noqa: F401
