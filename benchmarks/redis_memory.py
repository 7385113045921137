"""Bytes of Redis memory per stored message in cluster mode (docs/cluster.md).

Starts a private ``redis-server`` (durable, as a node requires) on a free
loopback port in a temporary directory, appends messages through a real
:class:`~securechat.redis_store.RedisStore`, and prints the growth of Redis's
``used_memory`` per message and the size of each key that holds them::

    .venv/bin/python benchmarks/redis_memory.py [--messages N] [--chars C]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import trio

from securechat import redis_link
from securechat.config import ClusterSection
from securechat.redis_store import PREFIX, RedisStore
from securechat.store import Appended, Draft, StoreError

START_TIMEOUT = 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def measure(port: int, messages: int, chars: int) -> None:
    section = ClusterSection.model_validate({"redis_url": f"redis://127.0.0.1:{port}/0"})
    with trio.fail_after(START_TIMEOUT):
        while True:
            try:
                async with redis_link.connect(section):
                    break
            except redis_link.ClusterError:
                await trio.sleep(0.05)
    async with redis_link.connect(section) as client, redis_link.connect(section) as tail:
        store = RedisStore(client, tail)
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            before = int(str((await client.info("memory"))["used_memory"]))
            answered = 0
            done = trio.Event()

            def then(outcome: Appended | StoreError) -> None:
                nonlocal answered
                if isinstance(outcome, StoreError):
                    raise SystemExit(f"not stored: {outcome}")
                answered += 1
                if answered == messages:
                    done.set()

            text = "x" * chars
            for number in range(messages):
                draft = Draft(
                    "alice", text, "2026-11-30T12:00:00.000Z", room="lobby", client_id=f"c{number}"
                )
                await store.append(draft, then)
            await done.wait()
            after = int(str((await client.info("memory"))["used_memory"]))
            print(
                f"{messages} messages of {chars} characters, with client ids:"
                f" {(after - before) / messages:.0f} bytes of Redis memory per message"
            )
            for key in ("msg", "all", "room:lobby", "log", "cid:alice\nc0"):
                usage = await client.memory_usage(PREFIX + key, samples=0) or 0
                count = 1 if key.startswith("cid:") else messages
                print(f"  {PREFIX + key!r}: {usage / count:.0f} bytes per message")
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--chars", type=int, default=100)
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen(  # noqa: S603 (a fixed program and our own arguments)
            [
                server,
                *("--port", str(port), "--bind", "127.0.0.1", "--dir", directory),
                *("--save", "", "--appendonly", "yes", "--appendfsync", "always"),
            ],
            stdout=(Path(directory) / "redis.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            trio.run(measure, port, args.messages, args.chars)
        finally:
            process.terminate()
            process.wait(START_TIMEOUT)


if __name__ == "__main__":
    main()
