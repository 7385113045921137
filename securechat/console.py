"""Line input with concurrent output, for the interactive client.

On a terminal, :class:`TerminalConsole` uses prompt_toolkit: the prompt runs
in a worker thread, and text shown while the user types is printed above the
prompt without corrupting the line being edited. Otherwise
:class:`PipeConsole` reads plain lines from stdin and writes plain lines to
stdout, with no prompt. Both are driven from Trio.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Protocol

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout


class Console(Protocol):
    colour: bool

    async def read_line(self) -> str | None:
        """The next line the user entered, without its newline; None at end of input."""

    def show(self, text: str) -> None:
        """Print ``text`` (one or more lines) without disturbing the input line."""

    async def aclose(self) -> None:
        """Stop reading input and restore the terminal."""


def open_console(prompt: Callable[[], str]) -> Console:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalConsole(prompt)
    return PipeConsole()


def colour_wanted() -> bool:
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ


class PipeConsole:
    """stdin lines in, stdout lines out; no prompt, no colour."""

    colour = False

    async def read_line(self) -> str | None:
        # abandon_on_cancel: a blocked read must not keep the client alive
        # after the connection has ended.
        line: str = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line:
            return None
        return line.removesuffix("\n").removesuffix("\r")

    def show(self, text: str) -> None:
        print(text, flush=True)

    async def aclose(self) -> None:
        pass


class TerminalConsole:
    """prompt_toolkit prompt in a worker thread; output printed above it."""

    def __init__(self, prompt: Callable[[], str]) -> None:
        self.colour = colour_wanted()
        self._prompt = prompt
        self._session: PromptSession[str] = PromptSession(erase_when_done=True)
        self._idle = threading.Event()  # set while no prompt is running
        self._idle.set()
        self._stack = ExitStack()
        # raw=True: our ANSI colour codes pass through unescaped.
        self._stack.enter_context(patch_stdout(raw=True))

    async def read_line(self) -> str | None:
        return await trio.to_thread.run_sync(self._read_blocking, abandon_on_cancel=True)

    def _read_blocking(self) -> str | None:
        self._idle.clear()
        try:
            return self._session.prompt(self._prompt)
        except (EOFError, KeyboardInterrupt):
            return None
        finally:
            self._idle.set()

    def show(self, text: str) -> None:
        print(text, flush=True)

    async def aclose(self) -> None:
        app = self._session.app
        loop = app.loop
        if app.is_running and loop is not None and not loop.is_closed():
            # The prompt's event loop lives in the worker thread: ask it to
            # finish there and wait, so that the terminal leaves raw mode
            # before the process exits.
            loop.call_soon_threadsafe(lambda: app.exit(exception=EOFError))
            await trio.to_thread.run_sync(self._idle.wait, 2.0)
        self._stack.close()
