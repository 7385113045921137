"""Line input with concurrent output, for the interactive client.

On a terminal, :class:`TerminalConsole` uses prompt_toolkit: the prompt runs
in a worker thread, and text shown while the user types is printed above the
prompt without corrupting the line being edited. A line the caller's
``check`` refuses stays in the input for the user to edit, and the reason is
printed above it. Otherwise :class:`PipeConsole` reads plain lines from stdin and
writes plain lines to stdout, with no prompt. Both are driven from Trio.

Pasting into the prompt must cost time and memory in proportion to the text
(see :class:`_PasteInput` and :func:`_editing_bindings`): prompt_toolkit
handles a terminal's unbracketed paste one key press at a time, and with
each it saved the whole input line for undo.
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
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import emacs_insert_mode, has_focus, vi_insert_mode
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.input.vt100 import Vt100Input
from prompt_toolkit.key_binding import KeyBindings, KeyPress, KeyPressEvent
from prompt_toolkit.key_binding.bindings.basic import if_no_repeat
from prompt_toolkit.key_binding.bindings.named_commands import get_by_name
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout.processors import Processor, Transformation, TransformationInput
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.validation import ValidationError

from .protocol import MAX_TEXT_CHARS

# The longest input line kept (a paste beyond it is cut, and the user told):
# 250 times the longest message, so the text never takes more than a few MB.
MAX_INPUT_CHARS = 1_000_000
# An input line longer than a message is shown folded: this many characters
# around the cursor, and the number of characters before and after them.
SHOWN_CHARS = MAX_TEXT_CHARS
REDRAW_INTERVAL = 0.05


class Console(Protocol):
    colour: bool

    async def read_line(self) -> str | None:
        """The next line the user entered, without its newline; None at end of input."""

    def show(self, text: str) -> None:
        """Print ``text`` (one or more lines) without disturbing the input line."""

    async def aclose(self) -> None:
        """Stop reading input and restore the terminal."""


Check = Callable[[str], str | None]
"""Why a line cannot be accepted (it then stays in the input), or None."""


def open_console(prompt: Callable[[], str], check: Check | None = None) -> Console:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return TerminalConsole(prompt, check)
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

    def __init__(self, prompt: Callable[[], str], check: Check | None = None) -> None:
        self.colour = colour_wanted()
        self._prompt = prompt
        self._session: PromptSession[str] = PromptSession(
            erase_when_done=True,
            input=_PasteInput(sys.stdin),
            key_bindings=_editing_bindings(check),
            input_processors=[_FoldLongLines()],
            # Validating while typing would clear the notices _insert puts under the input.
            validate_while_typing=False,
        )
        # A paste arrives in reads of 1 KB, and each used to be drawn: the
        # screen is redrawn at most 20 times a second instead.
        self._session.app.min_redraw_interval = REDRAW_INTERVAL
        self._idle = threading.Event()  # set while no prompt is running
        self._idle.set()
        self._stack = ExitStack()
        # raw=True: our ANSI colour codes pass through unescaped.
        self._stack.enter_context(patch_stdout(raw=True))
        # Between two prompts too (while a command waits for its answer), so
        # that what the user types ahead is not echoed into the output by
        # the terminal but kept for the next prompt.
        self._stack.enter_context(self._session.input.raw_mode())

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


# --- pasting -----------------------------------------------------------------------


class _PasteInput(Vt100Input):
    """The terminal's input, with each run of plain characters read at once taken as one paste.

    Without bracketed paste a terminal delivers pasted text as if typed, and
    prompt_toolkit runs its whole key-binding machinery per character (about
    half a millisecond each here, plus a copy of the line: 100 KB pasted
    took minutes). A person typing gets one key per read; a run of printable
    characters in one read came from a paste (or a very fast typist, to the
    same effect), so it is handed on as one ``BracketedPaste`` key whose
    text is inserted at once. Enter and every other key stay what they were,
    so a pasted line break still ends the line, as it did.
    """

    def read_keys(self) -> list[KeyPress]:
        return coalesce_text(super().read_keys())

    def flush_keys(self) -> list[KeyPress]:
        return coalesce_text(super().flush_keys())


def coalesce_text(keys: list[KeyPress]) -> list[KeyPress]:
    """``keys`` with each run of two or more printable characters merged into one paste key.

    A character right after Escape stays a key of its own: Escape then a
    key is Meta-key in the emacs bindings.
    """
    merged: list[KeyPress] = []
    run: list[str] = []

    def end_run() -> None:
        if len(run) == 1:
            merged.append(KeyPress(run[0]))
        elif run:
            merged.append(KeyPress(Keys.BracketedPaste, "".join(run)))
        run.clear()

    for key in keys:
        plain = not isinstance(key.key, Keys) and key.key.isprintable()
        if plain and not (not run and merged and merged[-1].key == Keys.Escape):
            run.append(key.key)
            continue
        end_run()
        merged.append(key)
    end_run()
    return merged


def _editing_bindings(check: Check | None) -> KeyBindings:
    """Enter, typing, pasting and deleting.

    Enter accepts the line unless ``check`` refuses it: then the reason is
    printed above the prompt and the line stays, to be edited (the
    validation toolbar would cut a reason longer than the terminal's width).

    Typing, pasting and deleting are saved for undo once per run of them
    rather than once per key.
    prompt_toolkit means to (``save_before=if_no_repeat``) but loses that
    setting when it registers these bindings (prompt-toolkit issue #1467),
    so every key press saved a copy of the whole line: a paste of n
    characters kept n²/2 bytes (5 GB for 100 KB). These are the same
    handlers, registered with the setting they were meant to have. Text
    typed or pasted beyond :data:`MAX_INPUT_CHARS` is not taken, and the
    line under the input says so; a line longer than a message says that.
    """
    insert_mode = vi_insert_mode | emacs_insert_mode
    bindings = KeyBindings()

    @bindings.add("enter", filter=has_focus(DEFAULT_BUFFER))
    def _enter(event: KeyPressEvent) -> None:
        reason = check(event.current_buffer.text) if check is not None else None
        if reason is None:
            event.current_buffer.validate_and_handle()
        else:
            print(reason, flush=True)

    for keys, command in (
        (("backspace",), "backward-delete-char"),
        (("delete",), "delete-char"),
        (("c-delete",), "delete-char"),
    ):
        bindings.add(*keys, filter=insert_mode, save_before=if_no_repeat)(
            get_by_name(command).handler
        )

    @bindings.add(Keys.Any, filter=insert_mode, save_before=if_no_repeat)
    def _type(event: KeyPressEvent) -> None:
        _insert(event, event.data * event.arg)

    @bindings.add(Keys.BracketedPaste, save_before=if_no_repeat)
    def _paste(event: KeyPressEvent) -> None:
        # Some terminals paste \r\n or \r line ends (as prompt_toolkit's own binding).
        _insert(event, event.data.replace("\r\n", "\n").replace("\r", "\n"))

    return bindings


def _insert(event: KeyPressEvent, text: str) -> None:
    buffer = event.current_buffer
    room = max(0, MAX_INPUT_CHARS - len(buffer.text))
    if len(text) > room:
        buffer.insert_text(text[:room])
        buffer.validation_error = ValidationError(
            message=f"the input is full ({MAX_INPUT_CHARS} characters): the rest was not taken"
        )
        return
    buffer.insert_text(text)
    if len(buffer.text) > MAX_TEXT_CHARS:
        buffer.validation_error = ValidationError(
            message=f"{len(buffer.text)} characters: at most {MAX_TEXT_CHARS} fit in a message"
            " (Ctrl-U clears the line)"
        )


class _FoldLongLines(Processor):
    """Shows an input line longer than :data:`SHOWN_CHARS` as the part around the cursor.

    Drawing the prompt costs time in proportion to the characters shown,
    on every key press: all of a 100 KB line took a quarter of a second.
    The characters left out are counted in their place,
    ``[… 95000 characters …]``. The shown part moves in steps of a quarter
    of its length as the cursor does, so it does not shift on every key.
    """

    def apply_transformation(self, ti: TransformationInput) -> Transformation:
        fragments = ti.fragments
        length = sum(len(fragment[1]) for fragment in fragments)
        if length <= SHOWN_CHARS:
            return Transformation(fragments)
        if ti.lineno == ti.document.cursor_position_row:
            cursor = ti.source_to_display(ti.document.cursor_position_col)
        else:
            cursor = length
        step = SHOWN_CHARS // 4
        start = min(max(0, (cursor // step) * step - SHOWN_CHARS // 2), length - SHOWN_CHARS)
        end = start + SHOWN_CHARS
        before = f"[… {start} characters …] " if start else ""
        after = f" [… {length - end} characters …]" if end < length else ""
        shown: StyleAndTextTuples = [("reverse", before)] if before else []
        offset = 0
        for fragment in fragments:
            style, text = fragment[0], fragment[1]
            piece = text[max(0, start - offset) : max(0, end - offset)]
            if piece:
                shown.append((style, piece))
            offset += len(text)
        if after:
            shown.append(("reverse", after))

        def to_display(position: int) -> int:
            return len(before) + min(max(position, start), end) - start

        def to_source(position: int) -> int:
            return start + min(max(position - len(before), 0), end - start)

        return Transformation(shown, to_display, to_source)
