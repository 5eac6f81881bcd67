"""`python -m chatstream_asgi`: the `chatstream-asgi` command."""

from __future__ import annotations

import sys

from chatstream_asgi.frontends.cli import main

sys.exit(main())
