"""Waiting over HTTP: how long a client will wait for a slot.

`X-ChatStream-Deadline: <seconds>` is the client's own limit on its wait in the queue; with
`ChatStream(max_queue_wait=...)` the smaller of the two wins. A request still waiting at its
deadline is refused with 503 `queue_timeout` and a `Retry-After` estimate (DESIGN §5).
"""

from __future__ import annotations

import math

from starlette.datastructures import Headers
from starlette.types import Scope

from chatstream_asgi.errors import InvalidRequest

DEADLINE_HEADER = "X-ChatStream-Deadline"


def queue_deadline(scope: Scope, max_queue_wait: float | None) -> float | None:
    """Seconds this request may wait for a slot (None: no limit); a bad header is 400 naming it."""
    raw = Headers(scope=scope).get(DEADLINE_HEADER)
    if raw is None:
        return max_queue_wait
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidRequest(f"{DEADLINE_HEADER} must be a number of seconds (0 or more), not {raw!r}")
    return seconds if max_queue_wait is None else min(seconds, max_queue_wait)
