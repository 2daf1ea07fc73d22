"""The pluggy markers and the contract version every plugin and host is checked against."""

import pluggy

PROJECT_NAME = "swiftk"

# Semantic version of the hook contract. Minor: hooks or optional arguments added (old plugins keep
# working, because the kernel calls hooks with keywords and an implementation may take a subset).
# Major: a hook removed or its meaning changed.
CONTRACT_VERSION = "0.1.0"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
