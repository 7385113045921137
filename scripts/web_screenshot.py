"""Take docs/web-client.png: the real chat page in Debian's Chromium, a few real messages.

Usage (from the repository root, after `make test` installed Playwright and chromium):

    .venv/bin/python -m scripts.web_screenshot [OUTPUT.png]

A throw-away server (its own CA, config and database in a temporary directory) runs as
``securechat server --console``; alice logs in on the page, bob talks from the terminal
client, the operator makes an announcement; then the page is photographed. The pieces are
the browser tests' (tests/browser.py).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from playwright.sync_api import expect

from securechat import certs, passwords
from tests.browser import WAIT, CliClient, WebServer, chromium, log_in, send, write_config

# Passwords of the throw-away users of this one run; nothing else knows them.
ALICE_PASSWORD = "screenshot-alice-password"  # noqa: S105


def main(output: Path) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        certs.generate(directory, clients=["bob"])
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": 0,
                "cert": str(directory / "server.crt"),
                "key": str(directory / "server.key"),
                "ca": str(directory / "ca.crt"),
            },
            "storage": {"path": str(directory / "chat.db")},
            "users": {
                "alice": {"password_hash": passwords.hash_password(ALICE_PASSWORD)},
                "bob": {},
            },
            "rooms": {"general": {"topic": "Anything goes"}, "release": {"topic": "Friday"}},
        }
        server = WebServer(write_config(directory / "server.toml", config), console=True)
        server.start()
        bob: CliClient | None = None
        try:
            with chromium() as browser:
                context = browser.new_context(
                    ignore_https_errors=True,  # the throw-away CA of this run
                    viewport={"width": 1000, "height": 600},
                )
                page = context.new_page()
                page.set_default_timeout(WAIT * 1000)
                log_in(page, server.url, "alice", ALICE_PASSWORD)
                page.get_by_label("Join or create a room").fill("general")
                page.get_by_label("Join or create a room").press("Enter")
                expect(page.locator("#conv-title")).to_have_text("#general")
                bob = CliClient(
                    server.port,
                    directory / "ca.crt",
                    "bob",
                    directory / "bob.crt",
                    directory / "bob.key",
                )
                bob.output.wait_for_pattern("logged in as bob")
                bob.type("/join general")
                bob.output.wait_for_pattern(r"joined general")
                send(page, "morning all, standup in 5?")
                bob.output.wait_for_pattern(r"alice: morning all")
                bob.type("on my way\nthe release notes are in #release")
                bob.type("/me grabs a coffee")
                bob.type("/msg alice can you review my patch after?")
                server.operator("The server restarts at 18:00 UTC for an upgrade.")
                messages = page.locator("#timeline li.msg:not(.pending)")
                expect(messages).to_have_count(5)
                send(page, "sure, send me the link")
                expect(messages).to_have_count(6)
                page.locator("#composer-text").fill("see you there")
                page.screenshot(path=str(output))
                context.close()
        finally:
            if bob is not None:
                bob.close()
            server.stop()
    print(f"wrote {output}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/web-client.png"))
