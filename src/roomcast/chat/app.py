"""The terminal: a prompt_toolkit prompt that reads commands while the server talks.

Under ``patch_stdout`` every line a backend shows is printed above the prompt, and the
line being typed is drawn again below it, so incoming messages never garble the input.
Commands run in the order typed, one at a time, while the prompt stays open for the next
line. Ctrl-D and ``/quit`` let the commands already typed finish, Ctrl-C does not; either
way the backend closes its connections and the exit code is 0. When the server will not
take the client back (its token refused on a reconnect) the client says why and ends with
exit code 1, as when it cannot connect at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import Queue
from collections.abc import Awaitable, Callable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.patch_stdout import patch_stdout

from . import view
from .backend import TIMEOUT, Backend, CommandFailed
from .commands import HELP, Command, UsageError, Verb, parse


class TerminalScreen:
    """Prints lines; inside ``patch_stdout`` they land above the prompt."""

    def show(self, text: str) -> None:
        print(text, flush=True)


def _actions(backend: Backend) -> dict[Verb, Callable[[Command], Awaitable[None]]]:
    return {
        Verb.SAY: lambda c: backend.say(c.arg),
        Verb.ALL: lambda c: backend.say_all(c.arg),
        Verb.MAKE: lambda c: backend.make(c.arg),
        Verb.LIST: lambda c: backend.list_rooms(),
        Verb.ROOMS: lambda c: backend.rooms(),
        Verb.JOIN: lambda c: backend.join(c.arg),
        Verb.LEAVE: lambda c: backend.leave(),
        Verb.USER: lambda c: backend.users(),
        Verb.HISTORY: lambda c: backend.history(c.count),
        Verb.EDIT: lambda c: backend.edit(c.seq, c.text),
        Verb.DELETE: lambda c: backend.delete(c.seq),
        Verb.NAME: lambda c: backend.rename(c.arg),
    }


async def execute(backend: Backend, screen: TerminalScreen, command: Command) -> None:
    """Carry out one command; a refusal is shown, not raised."""
    if command.verb is Verb.HELP:
        screen.show(HELP)
        return
    try:
        await _actions(backend)[command.verb](command)
    except CommandFailed as exc:
        screen.show(view.error(exc.code, exc.message))


async def _worker(backend: Backend, screen: TerminalScreen, queue: Queue[Command]) -> None:
    # Commands run one after the other, in the order typed, while the prompt stays open.
    while True:
        command = await queue.get()
        try:
            await execute(backend, screen, command)
        finally:
            queue.task_done()


async def main(backend: Backend, screen: TerminalScreen) -> int:
    """Connect, then read and carry out lines until the user leaves (or the server will
    not take the client back)."""
    session: PromptSession[str] = PromptSession(history=InMemoryHistory())
    with patch_stdout(raw=False):
        tasks: list[asyncio.Task[Any]] = []
        try:
            try:
                await backend.start()
            except CommandFailed as exc:
                screen.show(view.error(exc.code, exc.message))
                return 1
            screen.show(view.notice("/? lists the commands"))
            queue: Queue[Command] = Queue()
            tasks.append(asyncio.create_task(_worker(backend, screen, queue)))
            reading = asyncio.create_task(_read(session, backend, screen, queue))
            ended = asyncio.create_task(backend.ended())
            tasks += [reading, ended]
            await asyncio.wait([reading, ended], return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():
                why = ended.result()
                screen.show(view.error(why.code, why.message))
                return 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await backend.close()
            for task in tasks:
                failure = None if task.cancelled() else task.exception()
                if failure is not None:  # a bug: not hidden
                    raise failure
    return 0


async def _read(
    session: PromptSession[str], backend: Backend, screen: TerminalScreen, queue: Queue[Command]
) -> None:
    """Read lines and queue their commands until the user leaves."""

    def prompt() -> str:
        return f"[{view.clean(backend.room)}] {view.clean(backend.nick)}> "

    while True:
        try:
            line = await session.prompt_async(prompt)
        except KeyboardInterrupt:
            return
        except EOFError:
            await _drain(queue)
            return
        try:
            command = parse(line)
        except UsageError as exc:
            screen.show(view.error("usage", str(exc)))
            continue
        if command is not None and command.verb is Verb.QUIT:
            await _drain(queue)
            return
        if command is not None:
            queue.put_nowait(command)


async def _drain(queue: Queue[Command]) -> None:
    """Let the commands typed before leaving finish (bounded)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(queue.join(), TIMEOUT)
