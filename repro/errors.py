"""The error every refusal raises: one line that names the fix (the CLI prints it and exits 2).

It lives in its own module so that the lowest layers (``repro.kinds``, ``repro.config``) share it without importing
each other; ``repro.config.ConfigError`` is the same class.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad recipe, key or value; the message is one line that names the fix."""
