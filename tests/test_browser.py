"""The chat page (securechat/static) in a real Chromium against a real server.

alice uses the page in Debian's headless Chromium (Playwright's sync API); bob uses the terminal
client, ``securechat client``, as a process; the server is ``securechat server`` as a process,
serving the page and its WebSocket on its one TLS port. Nothing is mocked. See tests/browser.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Dialog, Page, expect
from pydantic import SecretStr

from securechat import tls
from securechat.client import ChatConnection
from securechat.protocol import History, HistoryEnd, Message

from .browser import WAIT, CliClient, WebServer, chromium, log_in, message_texts, send, write_config
from .conftest import PASSWORDS, Pki, config_data

pytestmark = pytest.mark.timeout(180)

ALICE = PASSWORDS["alice"]
TIMEOUT_MS = WAIT * 1000
HOSTILE = "<img src=x onerror=alert(1)>"
expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def server(tmp_path: Path, pki: Pki, password_hashes: dict[str, str]) -> Iterator[WebServer]:
    data = config_data(pki, password_hashes)
    data["storage"] = {"path": str(tmp_path / "chat.db")}
    # Fast enough that bob's 70-message burst in the paging test goes through in one go.
    data["limits"] = {"messages_per_second": 200.0, "message_burst": 200}
    running = WebServer(write_config(tmp_path / "server.toml", data), console=True)
    running.start()
    try:
        yield running
    finally:
        running.stop()


class Alice:
    """The page, and what it did that it must not: dialogs opened, console errors (a CSP
    violation is reported there), script errors."""

    def __init__(self, context: BrowserContext) -> None:
        self.context = context
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", self._dialog)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message: ConsoleMessage) -> None:
        # A WebSocket that failed to connect while the server was down is logged as an error
        # by Chromium itself; that one is expected in the restart test.
        if message.type == "error" and "WebSocket connection to" not in message.text:
            self.errors.append(message.text)


@pytest.fixture
def alice(browser: Browser) -> Iterator[Alice]:
    # The server's certificate comes from the test's throw-away CA, which this Chromium does
    # not trust (trusting it would mean an NSS database in a profile); the tests are about the
    # page, and TLS itself is tested in test_tls.py, so certificate errors are ignored here.
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1000, "height": 700})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield Alice(context)
    finally:
        context.close()


@pytest.fixture
def bob_factory(server: WebServer, pki: Pki) -> Iterator[Any]:
    started: list[CliClient] = []

    def start() -> CliClient:
        client = CliClient(server.port, pki.ca, "bob", pki.cert("bob"), pki.key("bob"))
        started.append(client)
        client.output.wait_for_pattern(r"logged in as bob")
        return client

    yield start
    for client in started:
        client.close()


def timeline(page: Page) -> Any:
    return page.locator("#timeline")


def open_conversation(page: Page, label: str) -> None:
    page.locator("#sidebar").get_by_role("button", name=label, exact=True).click()
    expect(page.locator("#conv-title")).to_have_text(label)


def stored_texts(server: WebServer, pki: Pki, user: str) -> list[str]:
    """Every message the server has stored that ``user`` can see, through a fresh line-protocol
    connection (``history`` from the start, paged)."""

    async def fetch() -> list[str]:
        context = tls.client_context(pki.ca)
        texts: list[str] = []
        with trio.fail_after(WAIT):
            connection = await ChatConnection.open("127.0.0.1", server.port, context)
            async with connection:
                await connection.login(user, SecretStr(PASSWORDS[user]))
                after, more = 0, True
                while more:
                    await connection.send(History(after=after, limit=500, id="h"))
                    while True:
                        envelope = await connection.receive()
                        assert envelope is not None
                        if isinstance(envelope, Message):
                            texts.append(envelope.text)
                        elif isinstance(envelope, HistoryEnd):
                            after, more = envelope.last, envelope.more
                            break
        return texts

    return trio.run(fetch)


# --- the tests -------------------------------------------------------------------------


def test_messages_both_ways_and_a_direct_message(
    server: WebServer, alice: Alice, bob_factory: Any
) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    expect(page.locator("#conv-title")).to_have_text("#lobby")
    bob = bob_factory()
    expect(timeline(page)).to_contain_text("bob is online")

    send(page, "hello bob, from the browser")
    bob.output.wait_for_pattern(r"\[lobby\] alice: hello bob, from the browser")
    bob.type("hi alice, from the terminal\nsecond line")
    expect(timeline(page).locator("li.msg .text")).to_have_text(
        ["hello bob, from the browser", "hi alice, from the terminal", "second line"]
    )

    # bob writes to alice directly: the conversation appears with an unread mark.
    bob.type("/msg alice just between us")
    dm_button = page.locator("#dm-list").get_by_role("button", name=re.compile("^bob"))
    expect(dm_button).to_contain_text("1")
    dm_button.click()
    expect(page.locator("#conv-title")).to_have_text("@bob")
    expect(timeline(page).locator("li.msg .text")).to_have_text(["just between us"])
    send(page, "noted, thanks")
    bob.output.wait_for_pattern(r"\[dm\] alice -> bob: noted, thanks")
    expect(page.locator("#timeline li.msg.pending")).to_have_count(0)
    assert message_texts(page) == ["just between us", "noted, thanks"]

    # Back in the lobby, everything once, in order.
    open_conversation(page, "#lobby")
    assert message_texts(page) == [
        "hello bob, from the browser",
        "hi alice, from the terminal",
        "second line",
    ]
    assert alice.dialogs == []
    assert alice.errors == []


def test_presence_of_bob_joining_and_leaving(
    server: WebServer, alice: Alice, bob_factory: Any
) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    page.get_by_label("Join or create a room").fill("dev")
    page.get_by_label("Join or create a room").press("Enter")
    expect(page.locator("#conv-title")).to_have_text("#dev")
    expect(page.locator("#member-list")).to_have_text("alice (online)")

    bob = bob_factory()
    expect(timeline(page)).to_contain_text("bob is online")
    bob.type("/join dev")
    expect(timeline(page)).to_contain_text("bob joined #dev")
    expect(page.locator("#member-list li")).to_have_text(["alice (online)", "bob (online)"])
    bob.type("/leave dev")
    expect(timeline(page)).to_contain_text("bob left #dev")
    expect(page.locator("#member-list li")).to_have_text(["alice (online)"])
    assert bob.quit() == 0
    expect(timeline(page)).to_contain_text("bob is offline")

    # The who button asks the server again.
    page.get_by_role("button", name="Who is here").click()
    expect(timeline(page)).to_contain_text("online: alice; members: alice")
    assert alice.errors == []


def test_history_after_a_page_reload(server: WebServer, alice: Alice, bob_factory: Any) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    bob = bob_factory()
    send(page, "before the reload, from alice")
    bob.output.wait_for_pattern(r"alice: before the reload, from alice")
    bob.type("before the reload, from bob")
    expect(timeline(page)).to_contain_text("before the reload, from bob")

    page.reload()
    expect(page.locator("#login-view")).to_be_visible()
    log_in(page, server.url, "alice", ALICE)
    expect(timeline(page).locator("li.msg .text")).to_have_text(
        ["before the reload, from alice", "before the reload, from bob"]
    )
    expect(page.locator("#history-start")).to_be_visible()
    assert alice.errors == []


def test_older_history_loads_on_scrolling_up(
    server: WebServer, alice: Alice, bob_factory: Any
) -> None:
    # The lobby's messages are far apart in the id sequence (ids are shared by all rooms, and
    # history pages only forward): 30 old ones, 300 in another room, then 60 new ones.
    bob = bob_factory()
    bob.type("\n".join(f"old {number}" for number in range(1, 31)))
    bob.type("/join noise")
    bob.type("\n".join(f"noise {number}" for number in range(1, 301)))
    bob.type("/switch lobby")
    bob.type("\n".join(f"new {number}" for number in range(1, 61)))
    bob.output.wait_for_pattern(r"bob: new 60$", within=3 * WAIT)
    expected = [f"old {number}" for number in range(1, 31)]
    expected += [f"new {number}" for number in range(1, 61)]

    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    # The opening page is the latest 50.
    expect(timeline(page).locator("li.msg")).to_have_count(50)
    assert message_texts(page) == expected[-50:]
    expect(page.locator("#history-start")).to_be_hidden()

    page.locator("#timeline-scroll").evaluate("scroller => { scroller.scrollTop = 0; }")
    expect(page.locator("#history-start")).to_be_visible()
    assert message_texts(page) == expected
    assert alice.errors == []


def test_markup_in_a_message_is_shown_as_text(
    server: WebServer, alice: Alice, bob_factory: Any
) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    bob = bob_factory()
    bob.type(HOSTILE)
    expect(timeline(page).locator("li.msg .text")).to_have_text([HOSTILE])
    # And from the page: what alice types is sent as she typed it.
    send(page, f"{HOSTILE} <script>alert(2)</script>")
    bob.output.wait_for_pattern(re.escape(f"alice: {HOSTILE} <script>alert(2)</script>"))
    expect(timeline(page).locator("li.msg:not(.pending) .text")).to_have_count(2)

    assert page.locator("#timeline img, #timeline script").count() == 0
    assert page.locator("img").count() == 0
    assert alice.dialogs == []
    assert alice.errors == []


def test_session_survives_a_server_restart(
    server: WebServer, pki: Pki, alice: Alice, bob_factory: Any
) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    bob = bob_factory()
    send(page, "before the restart")
    bob.output.wait_for_pattern(r"alice: before the restart")
    expect(page.locator("#timeline li.msg:not(.pending) .text")).to_have_text(
        ["before the restart"]
    )

    server.stop()
    expect(page.locator("#status")).to_contain_text("reconnecting")
    # Typed while the server is down: it waits, shown as sending, and goes after the reconnect.
    send(page, "sent while the server was down")
    expect(page.locator("#timeline li.msg.pending")).to_have_count(1)

    # While the page cannot reach the server, bob (reconnected) says something: alice's page
    # must catch up on it with `history after`, not only live.
    alice.context.set_offline(True)
    server.start()
    bob.output.wait_for_pattern(r"\[RECONNECTED\]")
    bob.type("said while alice was away")
    bob.output.wait_for_pattern(r"bob: said while alice was away")
    alice.context.set_offline(False)  # the page hears "online" and reconnects at once

    expect(page.locator("#status")).to_have_text("connected")
    expect(page.locator("#timeline li.msg.pending")).to_have_count(0)
    bob.output.wait_for_pattern(r"alice: sent while the server was down")
    expect(timeline(page).locator("li.msg .text")).to_have_text(
        ["before the restart", "said while alice was away", "sent while the server was down"]
    )
    # Delivered once: to bob, on the page and in the store.
    send(page, "after the restart")
    bob.output.wait_for_pattern(r"alice: after the restart")
    assert bob.count("sent while the server was down") == 1
    assert message_texts(page).count("sent while the server was down") == 1
    assert stored_texts(server, pki, "alice").count("sent while the server was down") == 1
    assert alice.errors == []


def test_a_wrong_password_is_refused_with_a_clear_message(server: WebServer, alice: Alice) -> None:
    page = alice.page
    page.goto(server.url)
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill("not her password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#login-error")).to_have_text(
        "Login refused: wrong username or password, or no matching certificate."
    )
    expect(page.locator("#chat-view")).to_be_hidden()
    # The form is usable again, and the right password gets in.
    log_in(page, server.url, "alice", ALICE)
    assert alice.errors == []


def test_operator_announcements_and_a_kick(
    server: WebServer, alice: Alice, bob_factory: Any
) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    server.operator("maintenance at noon <b>really</b>")
    announcement = timeline(page).locator("li.msg.announcement")
    expect(announcement).to_have_count(1)
    expect(announcement.locator(".label")).to_have_text("Announcement")
    expect(announcement.locator(".text")).to_have_text("maintenance at noon <b>really</b>")
    assert page.locator("#timeline b").count() == 0

    # A kick ends the session: back at the login form with the reason, no reconnect.
    server.operator("/kick alice testing the page")
    expect(page.locator("#login-view")).to_be_visible()
    expect(page.locator("#login-error")).to_have_text(
        "You were disconnected: kicked by server: testing the page"
    )
    bob = bob_factory()
    bob.type("/who lobby")
    bob.output.wait_for_pattern(r"\[lobby\] online: bob;")
    assert alice.errors == []


def test_keyboard_alone_on_a_phone_sized_screen(browser: Browser, server: WebServer) -> None:
    context = browser.new_context(
        ignore_https_errors=True,  # the test CA, as in the alice fixture
        viewport={"width": 390, "height": 760},
        is_mobile=True,
        has_touch=True,
    )
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)

        def focused() -> str:
            described: str = page.evaluate(
                "() => { const e = document.activeElement;"
                " return e.id || e.textContent.trim() || e.tagName; }"
            )
            return described

        def outline() -> str:
            style: str = page.evaluate(
                "() => getComputedStyle(document.activeElement).outlineStyle"
            )
            return style

        # The username field has the focus; Tab goes to the password; Enter logs in.
        assert focused() == "login-username"
        page.keyboard.type("alice")
        page.keyboard.press("Tab")
        assert focused() == "login-password"
        assert outline() == "solid"  # a visible focus ring
        page.keyboard.type(ALICE)
        page.keyboard.press("Enter")
        expect(page.locator("#status")).to_have_text("connected")

        # The message box has the focus: type, Enter sends.
        assert focused() == "composer-text"
        page.keyboard.type("typed on a phone")
        page.keyboard.press("Enter")
        expect(page.locator("#timeline li.msg:not(.pending) .text")).to_have_text(
            ["typed on a phone"]
        )
        page.keyboard.press("Tab")
        assert focused() == "send"

        # The room list is folded away on a narrow screen, behind the Rooms button.
        expect(page.locator("#sidebar")).to_be_hidden()
        page.locator("#nav-toggle").focus()
        assert outline() == "solid"
        page.keyboard.press("Enter")
        expect(page.locator("#sidebar")).to_be_visible()
        expect(page.locator("#nav-toggle")).to_have_attribute("aria-expanded", "true")
        assert focused() == "#lobby"
        page.keyboard.press("Tab")
        assert focused() == "join-room"
        page.keyboard.type("dev")
        page.keyboard.press("Enter")
        expect(page.locator("#conv-title")).to_have_text("#dev")
        expect(page.locator("#sidebar")).to_be_hidden()

        # Nothing sticks out sideways.
        assert page.evaluate(
            "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )
    finally:
        context.close()


def test_certificate_login_from_the_browser(browser: Browser, server: WebServer, pki: Pki) -> None:
    # Chromium presents alice's client certificate (as one imported into its store would be),
    # and she logs in with no password: the server's [server] client_certs = "optional".
    context = browser.new_context(
        ignore_https_errors=True,  # the test CA, as in the alice fixture
        client_certificates=[
            {
                "origin": server.url.rstrip("/"),
                "certPath": pki.cert("alice"),
                "keyPath": pki.key("alice"),
            }
        ],
    )
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url)
        page.get_by_label("Username").fill("alice")
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#status")).to_have_text("connected")
        expect(page.locator("#me")).to_have_text("alice")
        # The certificate is alice's: bob, with no password, is refused (its CN must be his
        # name), and the page says so.
        page.get_by_role("button", name="Log out").click()
        page.get_by_label("Username").fill("bob")
        page.get_by_role("button", name="Log in").click()
        expect(page.locator("#login-error")).to_have_text(
            "Login refused: wrong username or password, or no matching certificate."
        )
    finally:
        context.close()


def test_rooms_browse_join_switch_and_leave(server: WebServer, alice: Alice) -> None:
    page = alice.page
    log_in(page, server.url, "alice", ALICE)
    rooms = page.locator("#room-list .conv-button bdi")
    expect(rooms).to_have_text(["#lobby"])
    page.get_by_label("Join or create a room").fill("dev")
    page.get_by_label("Join or create a room").press("Enter")
    expect(page.locator("#conv-title")).to_have_text("#dev")
    expect(rooms).to_have_text(["#dev", "#lobby"])
    send(page, "in dev")
    expect(page.locator("#timeline li.msg:not(.pending) .text")).to_have_text(["in dev"])

    # Browse: every room the server has, with its member count; a click joins it.
    page.get_by_role("button", name="Browse all rooms").click()
    browse = page.locator("#browse-list .conv-button")
    expect(browse).to_have_count(2)
    expect(browse.first).to_contain_text("#dev (1 member)")
    open_conversation(page, "#lobby")
    expect(page.locator("#timeline li.msg")).to_have_count(0)
    browse.first.click()
    expect(page.locator("#conv-title")).to_have_text("#dev")
    expect(page.locator("#timeline li.msg:not(.pending) .text")).to_have_text(["in dev"])

    # A bad name is refused on the page, before it goes anywhere.
    page.get_by_label("Join or create a room").fill("Release Week!")
    page.get_by_label("Join or create a room").press("Enter")
    expect(page.locator("#alert-text")).to_contain_text("'Release Week!' is not a valid room name")

    page.get_by_role("button", name="Leave room").click()
    expect(page.locator("#conv-title")).to_have_text("#lobby")
    expect(rooms).to_have_text(["#lobby"])
    assert alice.errors == []
