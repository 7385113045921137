"""What the browser tests drive: a real ``securechat server`` process, the real terminal client
as a process, and Debian's Chromium through Playwright's sync API.

Playwright's sync API runs its own event loop, so these tests are plain (not trio) tests; the
server and bob's client are separate processes, as a user would run them, and everything here
waits on conditions (a log line, a line of output, a page state) with a deadline, never sleeps.
``scripts/web_screenshot.py`` uses the same pieces for the README's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
LISTENING = r"\[SEARCHING\] listening on 127.0.0.1:(\d+)"
# Every wait on the page, the server's log or bob's output ends by then: generous, for a
# loaded 2-core machine; passing tests come nowhere near it.
WAIT = 20.0


class Output:
    """The lines a process writes on one of its pipes, collected by a thread."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._lines: list[str] = []
        self.ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes]) -> None:
        with pipe:  # closed at EOF (the process ended): no pipe is left to the GC
            for raw in pipe:
                with self._changed:
                    self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def join(self) -> None:
        """Wait (bounded) until the process closed its end of the pipe."""
        self._thread.join(WAIT)

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait_for(
        self, predicate: Callable[[list[str]], Any], what: str, within: float = WAIT
    ) -> Any:
        """Wait until ``predicate(lines)`` is truthy and return its value."""
        deadline = time.monotonic() + within
        with self._changed:
            while not (found := predicate(self._lines)):
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self._lines[-30:])
                    raise AssertionError(f"timed out waiting for {what}; last lines:\n{tail}")
                self._changed.wait(left)
            return found

    def wait_for_pattern(self, pattern: str, within: float = WAIT) -> re.Match[str]:
        def search(lines: list[str]) -> re.Match[str] | None:
            return re.search(pattern, "\n".join(lines))

        match: re.Match[str] = self.wait_for(search, repr(pattern), within)
        return match


def _stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout=WAIT)


class WebServer:
    """``securechat server --config CONFIG`` as its own process; :meth:`restart` keeps its port."""

    def __init__(self, config: Path, *, console: bool = False) -> None:
        self.config = config
        self.console = console  # the operator's msg> prompt, on a pipe (see announce)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log: Output | None = None

    def start(self) -> None:
        port = ["--port", str(self.port)] if self.port else []
        console = ["--console"] if self.console else []
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "securechat",
                "server",
                "--config",
                str(self.config),
                *port,
                *console,
            ],
            stdin=subprocess.PIPE if self.console else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.process.stderr is not None
        self.log = Output(self.process.stderr)
        self.port = int(self.log.wait_for_pattern(LISTENING)[1])

    def operator(self, line: str) -> None:
        """A line typed at the operator's ``msg>`` prompt (needs ``console=True``)."""
        assert self.process is not None
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def stop(self) -> int:
        """SIGTERM: the server tells every client ``server_shutdown`` and exits."""
        assert self.process is not None
        assert self.log is not None
        code = _stop(self.process)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.log.join()
        return code

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """A TOML file of tables of scalars, lists and nested tables (enough for a test config)."""
    lines: list[str] = []

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return str(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(part) for part in item) + "]"
        return json.dumps(str(item))

    def table(name: str, values: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {key: item for key, item in values.items() if isinstance(item, dict)}
        lines.extend(f"{key} = {value(item)}" for key, item in values.items() if key not in nested)
        for key, item in nested.items():
            table(f"{name}.{key}", item)

    for name, values in data.items():
        table(name, values)
    path.write_text("\n".join(lines) + "\n")
    return path


class CliClient:
    """The terminal client (``securechat client``) as a process, its input a pipe.

    With stdin a pipe it carries out each line as if typed and prints what it receives, one
    line each, on stdout (``HH:MM:SS [lobby] alice: hi``); it reconnects by itself when the
    server goes away, like on a terminal.
    """

    def __init__(self, port: int, ca: Path, user: str, cert: Path, key: Path) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "securechat",
                "client",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--ca",
                str(ca),
                "--user",
                user,
                "--cert",
                str(cert),
                "--key",
                str(key),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
        )
        assert self.process.stdout is not None
        self.output = Output(self.process.stdout)

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def quit(self) -> int:
        """End of input: the client waits for its acks, says ``bye`` and exits."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            return self.process.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            return _stop(self.process)

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        _stop(self.process)
        self.output.join()

    def count(self, text: str) -> int:
        """How many lines of output show ``text`` as a message's text."""
        return sum(1 for line in self.output.lines() if line.endswith(f": {text}"))


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless (no browser is downloaded: Playwright drives this one)."""
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium"
            " (apt-get install chromium)"
        )
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            yield browser
        finally:
            browser.close()


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        # No sandbox: the tests run as root in a container, where Chromium's sandbox cannot
        # start. /dev/shm is small in containers; Chromium then uses /tmp instead.
        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        timeout=WAIT * 1000,
    )


def log_in(page: Page, url: str, username: str, password: str) -> None:
    page.goto(url)
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#chat-view")).to_be_visible(timeout=WAIT * 1000)
    expect(page.locator("#status")).to_have_text("connected", timeout=WAIT * 1000)


def send(page: Page, text: str) -> None:
    """Type ``text`` into the composer and press Enter, as a user would."""
    box = page.get_by_label("Message", exact=True)
    box.fill(text)
    box.press("Enter")


def message_texts(page: Page) -> list[str]:
    """The texts of the messages in the open conversation, in order (pending ones excluded)."""
    texts: list[str] = page.locator("#timeline li.msg:not(.pending) .text").all_text_contents()
    return texts
