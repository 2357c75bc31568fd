"""UntilSuspended: a plain await of a coroutine, plus one call at its first wait."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from roomcast.transports.socketio import UntilSuspended


async def test_a_coroutine_that_finishes_at_once_is_never_suspended():
    calls: list[str] = []

    async def at_once() -> int:
        calls.append("ran")
        return 7

    assert await UntilSuspended(at_once(), lambda: calls.append("suspended")) == 7
    assert calls == ["ran"]


async def test_the_callback_runs_once_at_the_first_wait_and_results_pass_through():
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()

    async def waits_twice() -> int:
        calls.append("before")
        a = await first
        calls.append("between")
        b = await second
        return a + b

    async def awaiting() -> int:
        return await UntilSuspended(waits_twice(), lambda: calls.append("suspended"))

    task = asyncio.create_task(awaiting())
    await asyncio.sleep(0)
    assert calls == ["before", "suspended"]
    first.set_result(1)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls == ["before", "suspended", "between"]
    second.set_result(2)
    assert await task == 3
    assert calls == ["before", "suspended", "between"]


async def test_exceptions_raised_before_and_after_the_first_wait_pass_through():
    async def fails_at_once() -> None:
        raise ValueError("at once")

    with pytest.raises(ValueError, match="at once"):
        await UntilSuspended(fails_at_once(), lambda: None)

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    with pytest.raises(KeyError, match="later"):
        await UntilSuspended(fails_later(), lambda: None)

    broken: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    broken.set_exception(OSError("from a future"))

    async def awaits_broken() -> Any:
        await asyncio.sleep(0)
        try:
            return await broken
        except OSError as exc:
            return f"caught {exc}"

    assert await UntilSuspended(awaits_broken(), lambda: None) == "caught from a future"


async def test_a_cancellation_reaches_the_coroutine_where_it_waits():
    seen: list[str] = []
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def waits_forever() -> None:
        try:
            await never
        except asyncio.CancelledError:
            seen.append("cancelled inside")
            raise

    async def awaiting() -> None:
        await UntilSuspended(waits_forever(), lambda: seen.append("suspended"))

    task = asyncio.create_task(awaiting())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["suspended", "cancelled inside"]
    assert never.cancelled()
