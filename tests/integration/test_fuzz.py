"""Random JSON thrown at every client event: every reply is a well-formed ack, errors carry
a code from the documented set, nothing invalid is stored, and the connection survives."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import socketio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roomcast.exceptions import ErrorCode

from .servers import Server, run_server

EVENTS = [
    "join",
    "leave",
    "send",
    "history",
    "rooms",
    "members",
    "typing",
    "dm",
    "no_such_event",
]
CODES = {code.value for code in ErrorCode}
SENTINEL = "fuzz-sentinel"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=70),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
shaped = st.fixed_dictionaries(
    {},
    optional={
        "room": json_values | st.just(SENTINEL),
        "text": json_values | st.text(min_size=0, max_size=4010),
        "since": json_values,
        "before": json_values,
        "limit": json_values,
        "after": json_values,
        "occupied": json_values,
        "members": json_values,
        "id": json_values,
        "to": json_values,
    },
)
to_sentinel = st.builds(
    lambda text: {"room": SENTINEL, "text": text}, json_values | st.text(max_size=4010)
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own, without rate limits: every payload reaches the events, none is
    turned away as ``rate_limited`` first."""
    args = ("--rate-limit", "0", "--request-rate-limit", "0")
    with run_server(*args, log_dir=tmp_path_factory.mktemp("server")) as srv:
        yield srv


def test_random_payloads_get_well_formed_acks(server):
    client = socketio.Client(reconnection=False)
    client.connect(
        server.url, socketio_path="/ws/socket.io", auth={"name": "fuzzer"}, wait_timeout=10
    )
    try:
        assert client.call("join", {"room": SENTINEL}, timeout=10)["ok"] is True
        stored: list[str] = []

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(event=st.sampled_from(EVENTS), payload=st.one_of(json_values, shaped, to_sentinel))
        def throw(event, payload):
            if event == "leave" and isinstance(payload, dict) and payload.get("room") == SENTINEL:
                payload = {**payload, "room": "not-the-sentinel"}
            reply = client.call(event, payload, timeout=10)
            assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
            if reply["ok"]:
                assert event != "no_such_event"
                if event == "send":
                    text = payload["text"]
                    assert isinstance(text, str) and 0 < len(text) <= 4000 and text.strip()
                    assert reply["message"]["text"] == text
                    if reply["message"]["room"] == sentinel_id:
                        stored.append(text)
            else:
                error = reply["error"]
                assert error["code"] in CODES, reply
                assert isinstance(error["message"], str) and error["message"]

        sentinel_id = client.call("members", {"room": SENTINEL}, timeout=10)["room"]["id"]
        throw()
        # The connection still works, and the sentinel room holds exactly the accepted sends.
        history = []
        before = None
        while True:
            args = {"room": SENTINEL, "limit": 100, **({"before": before} if before else {})}
            page = client.call("history", args, timeout=10)["messages"]
            if not page:
                break
            history = page + history
            before = page[0]["seq"]
        assert [m["text"] for m in history] == stored
    finally:
        client.disconnect()
