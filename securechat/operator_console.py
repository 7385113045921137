"""The server operator's ``msg>`` prompt (``securechat server --console``).

The seed server answered its client from a ``msg>`` prompt; here a line
typed at that prompt goes to every room as a message from ``server``
(stored like any other). Slash commands inspect and moderate: ``/who``,
``/rooms``, ``/kick USER [reason]``. ``/quit`` or end of input stops the
server, as Ctrl-C does.
"""

from __future__ import annotations

from .console import Console
from .hub import Hub
from .protocol import MAX_TOPIC_CHARS, ProtocolError, check_text

PROMPT = "msg> "
HELP = """\
A line is sent to every room as a message from 'server'.
  /who                 who is online
  /rooms               every room, with its member count
  /kick USER [REASON]  disconnect every connection of USER
  /quit                stop the server (also Ctrl-D)
  //text               send a line that starts with '/'"""


async def run_operator_console(hub: Hub, console: Console) -> None:
    """Serve the prompt until the operator quits or input ends."""
    while (line := await console.read_line()) is not None:
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not await _command(hub, console, line[1:]):
                return
            continue
        text = line[1:] if line.startswith("//") else line
        try:
            rooms = await hub.announce(check_text(text))
        except ProtocolError as exc:
            console.show(f"not sent: {exc.message}")
        else:
            console.show(f"sent to {rooms} room(s)")


async def _command(hub: Hub, console: Console, command: str) -> bool:
    """Run one slash command; False for /quit."""
    name, _, rest = command.partition(" ")
    if name == "quit":
        return False
    if name == "help":
        console.show(HELP)
    elif name == "who":
        online = hub.online_users()
        console.show(f"online ({len(online)}): {', '.join(online) or '-'}")
    elif name == "rooms":
        for room in hub.room_list(None).rooms:
            console.show(f"  {room.name} ({room.members} members) {room.topic}".rstrip())
    elif name == "kick":
        username, _, reason = rest.strip().partition(" ")
        if not username:
            console.show("usage: /kick USER [REASON]")
            return True
        try:
            hub.kick(username, by="server", reason=_one_line(reason)[:MAX_TOPIC_CHARS] or None)
        except ProtocolError as exc:
            console.show(exc.message)
        else:
            console.show(f"kicked {username}")
    else:
        console.show(f"unknown command /{name}; /help lists the commands")
    return True


def _one_line(text: str) -> str:
    return "".join(char for char in text if char.isprintable()).strip()
