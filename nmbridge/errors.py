"""Exceptions nmbridge raises; each carries a message an operator can act on."""

from __future__ import annotations


class NmbridgeError(Exception):
    """Base of every error nmbridge reports to a user."""


class ConfigError(NmbridgeError):
    """The configuration is invalid; the message names the file, key path and reason."""


class PortError(NmbridgeError):
    """A port could not be opened, synced or closed."""


class RingError(PortError):
    """A ring was used against netmap's rules (strict mode): names the port, ring and slot."""


class LinkError(NmbridgeError):
    """An interface could not be looked up or configured."""
