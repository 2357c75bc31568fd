"""A JSON codec for python-socketio and python-engineio: orjson to encode (every ack and
event the server writes), with the standard library as the fallback for what orjson refuses
(integers beyond 64 bits, non-string keys); the standard library to decode, because orjson
reads integers beyond 64 bits as floats and a client's JSON must be read exactly.

python-socketio takes the codec as a module-like object with ``dumps`` and ``loads``.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def dumps(obj: Any, **kwargs: Any) -> str:
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, separators=(",", ":"))


def loads(data: str | bytes, **kwargs: Any) -> Any:
    return json.loads(data)
