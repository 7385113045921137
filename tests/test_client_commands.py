"""The slash commands a chat veteran expects, and the words the client shows (no I/O)."""

from __future__ import annotations

import pytest

from securechat.client import (
    HELP,
    Ask,
    Formatter,
    Invalid,
    SendDirect,
    SendText,
    Switch,
    parse_input,
)
from securechat.protocol import (
    MAX_TEXT_CHARS,
    History,
    Join,
    Kick,
    Leave,
    Left,
    Message,
    RoomInfo,
    RoomList,
    RoomTopic,
    TopicRequest,
    Who,
)

RULES = "1-32 lowercase letters, digits, '_', '.' or '-', not starting with '.' or '-'"


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("/kick bob", Ask(Kick(username="bob"))),
        ("/kick bob  being rude ", Ask(Kick(username="bob", reason="being rude"))),
        ("/history", Ask(History(room="general", limit=20))),
        ("/history 50", Ask(History(room="general", limit=50))),
        ("/history @bob", Ask(History(peer="bob", limit=20))),
        ("/history @bob 5", Ask(History(peer="bob", limit=5))),
        ("/join ops", Ask(Join(room="ops"))),
        ("/leave lobby", Ask(Leave(room="lobby"))),
        ("/who", Ask(Who(room="general"))),
        ("/switch lobby", Switch("lobby")),
        ("/msg bob hi there", SendDirect("bob", "hi there")),
        ("/me waves", SendText("waves", action=True)),
        ("/topic", Ask(TopicRequest(room="general"))),
        ("/topic Release week", Ask(TopicRequest(room="general", topic="Release week"))),
        ("/topic -delete", Ask(TopicRequest(room="general", topic=""))),
    ],
)
def test_commands(line: str, command: object) -> None:
    assert parse_input(line, "general") == command


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (
            "/join Bad Room!",
            f"'Bad Room!' is not a valid room name: {RULES} (like /join bad-room)",
        ),
        ("/join -x", f"'-x' is not a valid room name: {RULES} (like /join x)"),
        ("/switch !!", f"'!!' is not a valid room name: {RULES}"),
        ("/msg Bob hi", f"'Bob' is not a valid username: {RULES} (like /msg bob)"),
        ("/kick", "usage: /kick USER [REASON]"),
        ("/kick Bob", f"'Bob' is not a valid username: {RULES} (like /kick bob)"),
        ("/kick bob " + "r" * 201, "the reason must be one line of at most 200 characters"),
        ("/history @", f"'' is not a valid username: {RULES}"),
        ("/history @Bob", f"'Bob' is not a valid username: {RULES} (like /history @bob)"),
        ("/history @bob x", "usage: /history [N] or /history @USER [N]"),
        ("/history 501", "N must be between 1 and 500"),
        ("/join", "usage: /join ROOM"),
        ("/nick bob", "unknown command /nick; /help lists the commands"),
        ("/me", "usage: /me ACTION"),
        ("/topic " + "t" * 201, "a topic is one line of at most 200 characters"),
        (
            "x" * (MAX_TEXT_CHARS + 1),
            f"message too long ({MAX_TEXT_CHARS + 1} characters, at most {MAX_TEXT_CHARS})",
        ),
    ],
)
def test_invalid_commands_say_why(line: str, reason: str) -> None:
    assert parse_input(line, "general") == Invalid(reason)


def test_help_names_the_limit_and_every_command() -> None:
    assert f"at most {MAX_TEXT_CHARS} characters" in HELP
    for command in (
        "/kick USER [REASON]",
        "/history @USER [N]",
        "/leave ROOM",
        "/switch",
        "/me ACTION",
        "/topic TEXT",
        "/topic -delete",
    ):
        assert command in HELP


def test_room_list_counts_members_in_words() -> None:
    rooms = RoomList(
        rooms=[
            RoomInfo(name="empty", topic="", members=0),
            RoomInfo(name="lobby", topic="", members=1),
            RoomInfo(name="ops", topic="Operators", members=2),
        ]
    )
    assert Formatter(me="bob", colour=False).describe(rooms) == (
        "rooms:\n  empty (0 members)\n  lobby (1 member)\n  ops (2 members) Operators"
    )


def test_leaving_the_lobby_says_it_lasts_until_the_next_login() -> None:
    formatter = Formatter(me="bob", colour=False)
    assert formatter.describe(Left(room="lobby")) == (
        "left lobby (everyone is put back in it at each login)"
    )
    assert formatter.describe(Left(room="ops")) == "left ops"


def test_actions_read_as_sentences() -> None:
    formatter = Formatter(me="bob", colour=False)
    ts = "2026-01-01T00:00:00.000Z"
    in_room = Message(id=1, room="lobby", sender="alice", text="waves", action=True, ts=ts)
    direct = Message(id=2, to="bob", sender="alice", text="nods", action=True, ts=ts)
    assert formatter.message(in_room).endswith(" [lobby] * alice waves")
    assert formatter.message(direct).endswith(" [dm] alice -> bob: * alice nods")


@pytest.mark.parametrize(
    ("envelope", "line"),
    [
        (RoomTopic(room="dev", topic="Release week"), "[dev] topic: Release week"),
        (RoomTopic(room="dev", topic=""), "[dev] no topic"),
        (
            RoomTopic(room="dev", topic="Ship it", by="alice"),
            "[dev] * alice set the topic: Ship it",
        ),
        (RoomTopic(room="dev", topic="", by="alice"), "[dev] * alice cleared the topic"),
        (
            RoomTopic(room="dev", topic="From the file", by="server"),
            "[dev] the topic is now (from the config file): From the file",
        ),
    ],
)
def test_topics(envelope: RoomTopic, line: str) -> None:
    assert Formatter(me="bob", colour=False).describe(envelope) == line
