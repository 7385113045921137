"""``python -m benchmarks.plot``: latency plots from the benchmark's JSON lines.

Three panels: delivery latency of fanout and rooms by percentile (the tail
stretched: 90, 99, 99.9 … are equally spaced), the other latencies
(connect handshake and login, idle ping round trip, durable ack), and the
server's CPU per delivery against the targets. Needs matplotlib (``pip
install -e '.[bench]'``; ``make bench`` installs it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .targets import TARGETS, lookup

HERE = Path(__file__).resolve().parent
DEFAULT_INPUT = HERE / "results" / "latest.jsonl"
DEFAULT_OUTPUT = HERE / "results" / "latency.png"
NINES = (0.0, 90.0, 99.0, 99.9, 99.99)


def _nines(percentile: float) -> float:
    """Percentile → 'number of nines', so that the tail gets the room it needs."""
    return -math.log10(max(1e-5, 1 - percentile / 100))


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _curves(records: list[dict[str, Any]], which: Sequence[tuple[str, str, str]]) -> list[Any]:
    """(label, curve points) for every (scenario, figure, label) present in ``records``."""
    found = []
    for record in records:
        for scenario, figure, label in which:
            if record["scenario"] != scenario:
                continue
            curve = lookup(record["results"], f"{figure}.curve")
            if curve:
                found.append((label.format(name=record["name"]), curve))
    return found


def _latency_axes(axes: Any, curves: list[Any], title: str) -> None:
    for label, points in curves:
        xs = [_nines(q) for q, _ in points]
        ys = [max(value, 1e-3) for _, value in points]
        axes.plot(xs, ys, marker=".", label=label)
    axes.set_yscale("log")
    axes.set_xticks([_nines(q) for q in NINES])
    axes.set_xticklabels([f"{q:g}" for q in NINES])
    axes.set_xlabel("percentile")
    axes.set_ylabel("milliseconds")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    if curves:
        axes.legend(fontsize="small")


def _cpu_axes(axes: Any, records: list[dict[str, Any]]) -> None:
    shown = [r for r in records if r["scenario"] in ("fanout", "rooms", "cluster-fanout")]
    names = [r["name"] for r in shown]
    values = [lookup(r["results"], "server_cpu_us_per_delivery") or 0.0 for r in shown]
    axes.bar(range(len(shown)), values, color="tab:blue")
    bounds = {t.key: t.bound for t in TARGETS if t.figure == "server_cpu_us_per_delivery"}
    for index, record in enumerate(shown):
        bound = bounds.get(record.get("target_key") or "")
        if bound is not None:
            axes.plot([index - 0.4, index + 0.4], [bound, bound], color="tab:red", linewidth=2)
    axes.set_xticks(range(len(shown)))
    axes.set_xticklabels(names, rotation=30, ha="right", fontsize="small")
    axes.set_ylabel("server CPU µs per delivery")
    axes.set_title("Server CPU per delivery (red: target)")
    axes.grid(True, axis="y", alpha=0.3)


def plot(records: list[dict[str, Any]], output: Path) -> None:
    # Imported here, by name: matplotlib is optional (the bench extra), and the
    # rest of the benchmarks (and their type check) must not need it.
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    figure, (first, second, third) = plt.subplots(1, 3, figsize=(18, 5.5))
    _latency_axes(
        first,
        _curves(
            records,
            [
                ("fanout", "latency_ms", "{name}"),
                ("rooms", "latency_ms", "{name}"),
                ("cluster-fanout", "latency_ms", "{name}"),
            ],
        ),
        "Delivery latency (send → every receiver)",
    )
    _latency_axes(
        second,
        _curves(
            records,
            [
                ("connect", "handshake_ms", "{name} handshake"),
                ("connect", "login_ms", "{name} login"),
                ("idle", "ping_rtt_ms", "{name} ping"),
                ("durable", "ack_latency_ms", "{name} ack"),
                ("cluster-connect", "handshake_ms", "{name} handshake"),
                ("cluster-connect", "login_ms", "{name} login"),
                ("cluster-durable", "ack_latency_ms", "{name} ack"),
            ],
        ),
        "Handshake, login, ping and ack latency",
    )
    _cpu_axes(third, records)
    when = max((record.get("time", "") for record in records), default="")
    machine = records[0].get("machine", {}) if records else {}
    cpus = f"{machine.get('nproc', '?')} × {machine.get('cpu_model', '?')}"
    figure.suptitle(
        f"securechat benchmarks {when} — {cpus}, Python {machine.get('python', '?')},"
        f" revision {machine.get('revision', '?')}"
    )
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__)
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="JSON lines to plot")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="PNG to write")
    args = parser.parse_args(argv)
    try:
        records = load(args.input)
    except FileNotFoundError:
        parser.error(f"{args.input}: no results yet (run python -m benchmarks first)")
    try:
        plot(records, args.output)
    except ModuleNotFoundError:
        parser.error("matplotlib is missing: pip install -e '.[bench]' (make bench does)")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
