"""Moved to `chatstream_asgi.frontends.cli`; `python -m chatstream_asgi.cli` still runs the command
for one release (`python -m chatstream_asgi` and `chatstream-asgi` are the ways to run it)."""

from __future__ import annotations

import sys
import warnings

from chatstream_asgi.frontends.cli import DTYPES, SERVER_OPENMP_SETTINGS, CommandError, build_app, main

if __name__ == "__main__":
    sys.exit(main())

warnings.warn(
    f"{__name__} moved to chatstream_asgi.frontends.cli",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "DTYPES",
    "SERVER_OPENMP_SETTINGS",
    "CommandError",
    "build_app",
    "main",
]
