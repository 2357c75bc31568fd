import json

import pytest

from roomcast.transports import fastjson


@pytest.mark.parametrize(
    "value",
    [{"a": [1, 2.5, None, True]}, "한국어 😀", 2**63 - 1, -(2**63), 2**70, [{"x": "<b>"}]],
)
def test_round_trip_matches_the_standard_library(value):
    encoded = fastjson.dumps(value, separators=(",", ":"))
    assert json.loads(encoded) == value
    assert fastjson.loads(json.dumps(value)) == value


def test_what_orjson_refuses_still_decodes():
    assert fastjson.loads("[NaN]")[0] != fastjson.loads("[NaN]")[0]  # NaN, as json reads it
    assert fastjson.loads(b'{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890
    }
    assert fastjson.dumps({1: "non-string key"}) == '{"1":"non-string key"}'
