"""The client in a real terminal: tmux runs ``securechat client``, the tests type and paste.

A terminal is what these tests are about: the prompt, what stays on the
screen, and pastes (``tmux paste-buffer`` without ``-p`` delivers the text as
if typed, as a terminal without bracketed paste does; with ``-p`` it is
bracketed). The server is real and in-process; a second, scripted user
watches what arrives. ``make test`` installs tmux where it is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from securechat.protocol import MAX_TEXT_CHARS, Message

from .conftest import PASSWORDS, WAIT, RunningServer, receive_type

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="needs tmux (`make test` installs it)")

WIDTH, HEIGHT = 120, 40


class Terminal:
    """One tmux window running the client; its own tmux server (socket in a temporary dir)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    async def tmux(self, *args: str) -> str:
        assert TMUX is not None
        result = await trio.run_process(
            [TMUX, "-S", str(self.socket), *args], capture_stdout=True, capture_stderr=True
        )
        return result.stdout.decode()

    async def screen(self) -> str:
        """What the terminal shows, scrollback included, wrapped lines joined."""
        return await self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "chat")

    async def wait_for(self, predicate: Callable[[str], bool], seconds: float = WAIT) -> str:
        """Poll the screen (a terminal has no event to wait on) until ``predicate`` holds."""
        screen = ""
        with trio.move_on_after(seconds):
            while not predicate(screen := await self.screen()):  # noqa: ASYNC110
                await trio.sleep(0.05)
            return screen
        raise AssertionError(f"not on the screen after {seconds} s:\n{screen}")

    async def wait_for_text(self, text: str, seconds: float = WAIT) -> str:
        return await self.wait_for(lambda screen: text in screen, seconds)

    async def type(self, text: str) -> None:
        """Type ``text`` and press Enter."""
        await self.tmux("send-keys", "-t", "chat", "-l", text)
        await self.tmux("send-keys", "-t", "chat", "Enter")

    async def keys(self, *keys: str) -> None:
        await self.tmux("send-keys", "-t", "chat", *keys)

    async def paste(self, text: str, *, bracketed: bool) -> None:
        path = self.socket.with_name("paste.txt")
        path.write_text(text)
        await self.tmux("load-buffer", "-b", "paste", str(path))
        await self.tmux("paste-buffer", "-b", "paste", "-t", "chat", *(["-p"] if bracketed else []))

    async def client_pid(self) -> int:
        """The client's process id (the child of the pane's shell)."""
        shell = int(await self.tmux("display-message", "-p", "-t", "chat", "#{pane_pid}"))
        children = (await trio.Path(f"/proc/{shell}/task/{shell}/children").read_text()).split()
        assert len(children) == 1, children
        return int(children[0])

    async def exit_status(self) -> int:
        """Wait for the client to exit; its exit status (the pane's shell prints it)."""
        screen = await self.wait_for(lambda screen: EXIT_STATUS.search(screen) is not None)
        found = EXIT_STATUS.search(screen)
        assert found is not None
        return int(found[1])


EXIT_STATUS = re.compile(r"^\[exit status (\d+)\]$", re.MULTILINE)


@asynccontextmanager
async def client_terminal(
    server: RunningServer, tmp_path: Path, user: str
) -> AsyncIterator[Terminal]:
    """``securechat client`` logged in as ``user`` with a password, in a fresh tmux."""
    assert TMUX is not None
    terminal = Terminal(tmp_path / "tmux.sock")
    command = [
        *(sys.executable, "-m", "securechat", "client", "--host", server.host),
        *("--port", str(server.port), "--ca", str(server.pki.ca), "--user", user),
    ]
    # The password reaches the client through the tmux server's environment.
    env = {**os.environ, "NO_COLOR": "1", "SECURECHAT_PASSWORD": PASSWORDS[user]}
    env.pop("TMUX", None)
    await trio.run_process(
        [
            *(TMUX, "-S", str(terminal.socket), "-f", "/dev/null", "new-session", "-d"),
            *("-s", "chat", "-x", str(WIDTH), "-y", str(HEIGHT)),
            # (tmux's own dead-pane status was not always there once the client exited)
            f"{shlex.join(command)}; echo [exit status $?]; sleep {WAIT * 10}",
        ],
        env=env,
    )
    try:
        await terminal.wait_for_text("send>>>")
        yield terminal
    finally:
        with trio.move_on_after(WAIT):
            await terminal.tmux("kill-server")


def last_line(screen: str) -> str:
    """The last line with text on it (tmux leaves out trailing spaces)."""
    return ([line for line in screen.splitlines() if line.strip()] or [""])[-1]


def prompt_line(screen: str) -> str:
    """The prompt and the start of the input (the rest is drawn on rows of its own)."""
    return ([line for line in screen.splitlines() if "] send>>>" in line] or [""])[-1]


def peak_memory_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match[1])


def current_memory_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None
    return int(match[1])


async def test_unbracketed_paste_of_100_kb_is_taken_at_once_and_kept(
    server: RunningServer, tmp_path: Path
) -> None:
    # Each pasted character used to be a key press that saved the whole line
    # for undo: 100 KB took minutes of CPU and grew the client by gigabytes.
    alice = await server.login("alice")
    async with client_terminal(server, tmp_path, "bob") as terminal:
        pid = await terminal.client_pid()
        before = current_memory_kib(pid)
        await terminal.paste("x" * 100_000, bracketed=False)
        await terminal.wait_for_text(
            f"100000 characters: at most {MAX_TEXT_CHARS} fit in a message", seconds=WAIT * 3
        )
        # The line is shown folded: the part around the cursor, the rest counted.
        assert "[… 96000 characters …]" in await terminal.screen()
        grown_mib = (peak_memory_kib(pid) - before) / 1024
        assert grown_mib < 64, f"the client grew by {grown_mib:.0f} MiB"

        await terminal.keys("Enter")  # too long: refused, and still in the input
        await terminal.wait_for_text("message too long (100000 characters, at most 4000)")
        await terminal.wait_for(lambda screen: "[… 96000 characters …]" in prompt_line(screen))

        await terminal.keys("C-u")
        await terminal.type("a line after the paste")
        message = await receive_type(alice, Message)
        assert (message.sender, message.text) == ("bob", "a line after the paste")
        await terminal.type("/quit")
        assert await terminal.exit_status() == 0


async def test_bracketed_paste_over_the_limit_stays_to_be_shortened_then_goes(
    server: RunningServer, tmp_path: Path
) -> None:
    alice = await server.login("alice")
    async with client_terminal(server, tmp_path, "bob") as terminal:
        await terminal.paste("z" * (MAX_TEXT_CHARS + 1000), bracketed=True)
        await terminal.wait_for_text("5000 characters: at most 4000 fit in a message")
        await terminal.keys("Enter")
        await terminal.wait_for_text("message too long (5000 characters, at most 4000)")
        await terminal.keys("-N", "1001", "BSpace")  # shorten it by 1001 characters
        await terminal.keys("Enter")
        message = await receive_type(alice, Message)
        assert message.text == "z" * (MAX_TEXT_CHARS - 1)


async def test_typed_commands_stay_in_the_scrollback(server: RunningServer, tmp_path: Path) -> None:
    async with client_terminal(server, tmp_path, "bob") as terminal:
        await terminal.type("/rooms")
        await terminal.type("/join general")
        screen = await terminal.wait_for_text("joined general; members: bob")
        lines = screen.splitlines()
        rooms = lines.index("[lobby] send>>> /rooms")
        assert lines[rooms + 1 : rooms + 3] == ["rooms:", "  lobby (1 member)"]
        assert lines[lines.index("[lobby] send>>> /join general") + 1].startswith("joined general")
        await terminal.wait_for(lambda screen: last_line(screen) == "[general] send>>>")


async def test_a_name_that_cannot_be_a_room_is_explained_and_kept(
    server: RunningServer, tmp_path: Path
) -> None:
    async with client_terminal(server, tmp_path, "bob") as terminal:
        await terminal.type("/join Bad Room!")
        screen = await terminal.wait_for(
            lambda screen: (
                last_line(screen) == "[lobby] send>>> /join Bad Room!"
                and "is not a valid room name" in screen
            )
        )
        assert "1-32 lowercase letters, digits, '_', '.' or '-'" in screen
        assert "(like /join bad-room)" in screen
