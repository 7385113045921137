"""The command line: ``python -m benchmarks [scenario ...] [--quick]``.

Prints one JSON line per measured result on stdout as it is done, progress
on stderr, and a table comparing every figure with the targets of issues 5,
9, 12 and 14 at the end; writes the JSON lines to ``benchmarks/results/latest.jsonl``
(``--output``), the tables in Markdown beside it (``latest.md``), and
appends the lines to ``benchmarks/results/history.jsonl``. Exit code 0
when every scenario ran (targets may be missed), 1 when one could not run,
2 for bad arguments, 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

from . import targets
from .driver import BenchError
from .scenarios import ALIASES, FULL, GROUPS, QUICK, SCENARIOS, Bench

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TEMP_PREFIX = "securechat-bench-"
LOCK = Path(tempfile.gettempdir()) / "securechat-bench.lock"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Benchmark a real securechat server on loopback: fanout, rooms, connect, idle,"
            " durable, freeze, and the same on a cluster (--workers N + Redis): cluster-fanout,"
            " cluster-connect-certs, cluster-durable, and securechat beside ngIRCd: peers"
            " (default: all, in that order)."
        ),
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of: {', '.join([*SCENARIOS, *ALIASES, *GROUPS])}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="reduced sizes: checks the tool in well under a minute"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="generator processes for receiving connections (default: 2)",
    )
    parser.add_argument(
        "--server-workers",
        type=int,
        default=2,
        help=(
            "worker processes of the cluster scenarios' server (`securechat server --workers N`);"
            " the targets are for 2 (default: 2)"
        ),
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=RESULTS / "latest.jsonl",
        help="where to write the JSON lines (default: benchmarks/results/latest.jsonl)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=1800.0,
        help="stop everything after this many seconds (default: 1800)",
    )
    parser.add_argument(
        "--runs",
        type=int,
        help=(
            "measured runs per fanout, rooms and durable result; the median run is reported"
            " (default: 3, or 1 with --quick)"
        ),
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        type=_setting,
        help=(
            "a server config setting for every scenario, VALUE in TOML"
            " (e.g. server.flush_interval_ms=5); repeatable"
        ),
    )
    parser.add_argument(
        "--lock-wait",
        type=float,
        default=900.0,
        help=(
            "runs on one machine take turns (they would measure each other);"
            " wait this long for another run to finish (default: 900 s)"
        ),
    )
    parser.add_argument(
        "--server-code",
        type=Path,
        metavar="DIR",
        help=(
            "run the server from the securechat package in DIR instead of this checkout"
            " (e.g. a `git worktree` of an older commit, to compare); the tool is this one"
        ),
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (configs, server logs)"
    )
    return parser


def _setting(text: str) -> tuple[str, str, Any]:
    name, separator, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not (separator and dot and section and key):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SECTION.KEY=VALUE")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: a string
    return section, key, value


class _Stop(BaseException):
    """SIGTERM or the time limit: unwind, stopping every process on the way."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    runnable = {**SCENARIOS, **ALIASES}
    asked = [part for name in args.scenarios for part in GROUPS.get(name, (name,))]
    names: list[str] = list(dict.fromkeys(asked)) or list(SCENARIOS)
    unknown = [name for name in names if name not in runnable]
    if unknown:
        choices = ", ".join([*SCENARIOS, *ALIASES, *GROUPS])
        print(f"unknown scenario {unknown[0]!r}; choose from {choices}", file=sys.stderr)
        return 2
    if args.server_code is not None:
        args.server_code = args.server_code.resolve()
        if not (args.server_code / "securechat" / "__main__.py").is_file():
            print(f"--server-code {args.server_code}: no securechat package there", file=sys.stderr)
            return 2
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    if not 1 <= args.server_workers <= 64:
        print("--server-workers must be between 1 and 64", file=sys.stderr)
        return 2
    overrides: dict[str, dict[str, Any]] = {}
    for section, key, value in args.set:
        overrides.setdefault(section, {})[key] = value
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGALRM, _stop)
    try:
        lock = _exclusive(args.lock_wait)
    except KeyboardInterrupt:
        return 130
    except _Stop:
        return 1
    if lock is None:
        print(
            f"another benchmark run still holds {LOCK} after {args.lock_wait:.0f} s",
            file=sys.stderr,
        )
        return 1
    signal.alarm(max(1, int(args.time_limit)))

    _remove_stale_directories()
    root = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    (root / "owner.pid").write_text(str(os.getpid()))
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    started = time.monotonic()

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        print(json.dumps(record), flush=True)

    status = 0
    try:
        bench = Bench(
            root,
            REPO,
            QUICK if args.quick else FULL,
            quick=args.quick,
            workers=args.workers,
            emit=emit,
            overrides=overrides,
            runs=args.runs or (1 if args.quick else 3),
            server_code=args.server_code,
            server_workers=args.server_workers,
        )
        for name in names:
            try:
                runnable[name](bench)
            except BenchError as exc:
                failures.append(f"{name}: {exc}")
                bench.log(f"{name} FAILED: {exc}")
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        status = 130
    except _Stop as exc:
        print(f"stopped ({exc}); everything stopped", file=sys.stderr)
        status = 1
    finally:
        signal.alarm(0)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    if records:
        _write(args.output, records)
        print()
        print(targets.text_table(records))
        print(
            f"\n{len(records)} results in {time.monotonic() - started:.0f} s;"
            f" JSON lines in {_shown(args.output)}"
        )
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    if failures and status == 0:
        status = 1
    return status


def _write(output: Path, records: list[dict[str, Any]]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in records)
    output.write_text(lines)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "history.jsonl").open("a") as history:
        history.write(lines)
    output.with_suffix(".md").write_text(
        "### Against the targets\n\n"
        + targets.markdown_targets(records)
        + "\n\n### All figures\n\n"
        + targets.markdown_table(records)
        + "\n"
    )


def _shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _remove_stale_directories() -> None:
    """Temporary directories of earlier runs that were killed before they could clean up."""
    for directory in Path(tempfile.gettempdir()).glob(TEMP_PREFIX + "*"):
        try:
            owner = int((directory / "owner.pid").read_text())
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (no pid file yet, or another user's)


def _exclusive(wait: float) -> IO[str] | None:
    """Take the machine-wide benchmark lock (held until this process exits), waiting up to
    ``wait`` seconds for another run; None if it is still busy."""
    lock = LOCK.open("a+")
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                return None
            if not told:
                lock.seek(0)
                holder = lock.read().strip() or "?"
                print(
                    f"waiting for another benchmark run (pid {holder}) to finish", file=sys.stderr
                )
                told = True
            time.sleep(1.0)
            continue
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        return lock
