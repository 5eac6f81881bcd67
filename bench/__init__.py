"""Benchmarks of chatstream-asgi (not part of the distribution). Run: python -m bench

The processes it starts (and this one, for the in-process baselines) use the OpenMP settings
`chatstream-asgi serve` uses, set here before torch loads, so every figure compares like with like.
"""

import os

for _name, _value in {"GOMP_SPINCOUNT": "20000", "KMP_BLOCKTIME": "1"}.items():
    os.environ.setdefault(_name, _value)
