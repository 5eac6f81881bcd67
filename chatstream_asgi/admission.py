"""Moved to `chatstream_asgi.runtime.admission`: this path re-exports its public names for one release.

Import them from `chatstream_asgi` (or from `chatstream_asgi.runtime.admission`); this module will be removed.
"""

from __future__ import annotations

import warnings

from chatstream_asgi.runtime.admission import (
    ADMISSION_POLICIES,
    Admission,
    AdmissionPolicy,
    Load,
    PositionReport,
    Slot,
    Ticket,
)
from chatstream_asgi.runtime.replicas import ReplicaAffinity

warnings.warn(
    f"{__name__} moved to chatstream_asgi.runtime.admission",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ADMISSION_POLICIES",
    "Admission",
    "AdmissionPolicy",
    "Load",
    "PositionReport",
    "ReplicaAffinity",
    "Slot",
    "Ticket",
]
