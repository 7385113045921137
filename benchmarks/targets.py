"""The targets of issues 5, 9, 12 and 14, how a result compares with them, and the tables.

A target names a figure of a result (a dotted path into its ``results``),
a comparison and a bound, with the reference it came from. Each record
carries a ``target_key`` saying which targets apply (the quick run keeps the
key of the size it stands in for, and says that it is quick). Some of issue
12's targets are ratios to the one-process result of the same run: the
cluster scenarios compute them into ``vs_one_process``. Issue 14's are ratios to
ngIRCd's result of the same pattern in the same run (``vs_ngircd``, from the
``peers`` scenario).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    key: str
    figure: str
    op: str  # "<=", "<", ">=", "=="
    bound: float
    reference: str = ""

    def met(self, value: float) -> bool:
        if self.op == "<=":
            return value <= self.bound
        if self.op == "<":
            return value < self.bound
        if self.op == ">=":
            return value >= self.bound
        return value == self.bound

    def describe(self) -> str:
        bound = f"{self.bound:g}"
        return f"{self.op} {bound}" + (f" ({self.reference})" if self.reference else "")


NGIRCD_FULL = "ngIRCd 4.3-5.1, miniircd 6.8"
NGIRCD_PACED = "ngIRCd 8.6-10.8, miniircd 14.2"
TARGETS = (
    Target("fanout-1000-full", "server_cpu_us_per_delivery", "<=", 4.3, NGIRCD_FULL),
    Target("fanout-1000-full", "deliveries_per_s", ">=", 200_000),
    Target("fanout-1000-full", "lost", "==", 0),
    Target("fanout-1000-paced", "deliveries_per_s", ">=", 49_500, "keeps up with 50 msg/s"),
    Target("fanout-1000-paced", "server_cpu_us_per_delivery", "<=", 12, NGIRCD_PACED),
    Target("fanout-1000-paced", "latency_ms.p99", "<=", 60, "ngIRCd 47-93 ms"),
    Target("fanout-1000-paced", "lost", "==", 0),
    Target("rooms-10x100", "deliveries_per_s", ">=", 150_000),
    Target("rooms-10x100", "lost", "==", 0),
    Target("connect-certs", "logins_per_s", ">=", 800, "ngIRCd ~975 registrations/s"),
    Target("idle-10000", "rss_kib_per_connection", "<=", 64),
    Target("idle-10000", "ping_rtt_ms.p99", "<", 50),
    Target("durable", "acked_per_s", ">=", 20_000, "SQLite ~1000 writes/s unbatched"),
    # Issue 9, finding 1: one user pipelining requests must not freeze the others.
    Target("freeze", "ping_rtt_ms.p99", "<", 50, "issue 9 finding 1"),
    Target("freeze", "pings_unanswered", "==", 0),
    # Issue 12: `securechat server --workers 2` + Redis on this 2-core machine, the
    # generator sharing the cores; CPU summed over the supervisor, workers and Redis.
    Target("cluster-fanout-1000-paced", "deliveries_per_s", ">=", 49_500, "keeps up"),
    Target("cluster-fanout-1000-paced", "latency_ms.p99", "<=", 60, "issue 12"),
    Target("cluster-fanout-1000-paced", "lost", "==", 0),
    Target(
        "cluster-fanout-1000-full",
        "vs_one_process.server_cpu_us_per_delivery",
        "<=",
        1.3,
        "x one process, workers + Redis",
    ),
    Target("cluster-fanout-1000-full", "lost", "==", 0),
    Target("cluster-connect-certs", "vs_one_process.logins_per_s", ">=", 1.6, "x one process"),
    Target("cluster-durable", "acked_per_s", ">=", 10_000, "acks after Redis's fsync"),
    Target("cluster-durable", "every_ack_stored", "==", 1, "after SIGKILL of Redis"),
    # Issue 14: securechat / ngIRCd 26, 1000 receivers, the same generator, the same run.
    Target("peers-paced", "vs_ngircd.deliveries_per_s", ">=", 0.99, "x ngIRCd: keeps up"),
    Target("peers-paced", "vs_ngircd.server_cpu_us_per_delivery", "<=", 1.0, "x ngIRCd"),
    Target("peers-paced", "vs_ngircd.latency_ms_p99", "<=", 2.0, "x ngIRCd"),
    Target("peers-paced", "latency_ms.p99", "<=", 60, "issue 14"),
    Target("peers-paced", "lost", "==", 0),
    Target(
        "peers-per-delivery",
        "vs_ngircd.server_cpu_us_per_delivery",
        "<=",
        1.0,
        "x ngIRCd (issue 14: 1.49x)",
    ),
    Target("peers-per-delivery", "lost", "==", 0),
    Target("peers-burst", "vs_ngircd.server_cpu_us_per_delivery", "<=", 0.6, "x ngIRCd"),
    Target("peers-burst", "lost", "==", 0),
    # Issue 14, one process: the cost of a login, durable throughput, idle memory.
    Target("connect-certs", "server_cpu_ms_per_login", "<=", 1.6, "issue 14"),
    Target("durable", "acked_per_s", ">=", 25_000, "issue 14"),
    Target("idle-10000", "rss_kib_per_connection", "<=", 48, "issue 14"),
)

# The figures the table shows for each scenario, besides those with targets.
HEADLINES: dict[str, tuple[str, ...]] = {
    "fanout": (
        "deliveries_per_s",
        "latency_ms.p50",
        "latency_ms.p90",
        "latency_ms.p99",
        "latency_ms.max",
        "lost",
        "server_cpu_us_per_delivery",
        "cpu.server_cpu_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
    ),
    "rooms": (
        "deliveries_per_s",
        "latency_ms.p50",
        "latency_ms.p99",
        "lost",
        "server_cpu_us_per_delivery",
        "cpu.server_cpu_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
    ),
    "connect": (
        "logins_per_s",
        "handshake_ms.p50",
        "handshake_ms.p99",
        "login_ms.p99",
        "failed",
        "presence_frames_received",
        "server_cpu_ms_per_login",
        "cpu.server_cpu_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
    ),
    "idle": (
        "connections",
        "rss_kib_per_connection",
        "ping_rtt_ms.p50",
        "ping_rtt_ms.p99",
        "ping_rtt_ms.max",
        "connections_per_s",
        "server_cpu_ms_per_connection",
        "idle_cpu.server_cpu_share",
        "shutdown_s",
    ),
    "durable": (
        "acked_per_s",
        "ack_latency_ms.p50",
        "ack_latency_ms.p99",
        "stored_after_stop",
        "server_cpu_us_per_ack",
        "cpu.server_cpu_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
    ),
    "cluster-fanout": (
        "deliveries_per_s",
        "vs_one_process.deliveries_per_s",
        "latency_ms.p50",
        "latency_ms.p99",
        "vs_one_process.latency_ms_p99",
        "latency_ms.max",
        "lost",
        "server_cpu_us_per_delivery",
        "vs_one_process.server_cpu_us_per_delivery",
        "node_cpu_us_per_delivery",
        "redis_cpu_us_per_delivery",
        "redis_fraction_of_server_cpu",
        "cpu.server_cpu_share",
        "cpu.redis_cpu_share",
        "cpu.server_runqueue_wait_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
        "workers.split",
    ),
    "cluster-connect": (
        "logins_per_s",
        "vs_one_process.logins_per_s",
        "handshake_ms.p50",
        "handshake_ms.p99",
        "login_ms.p99",
        "failed",
        "server_cpu_ms_per_login",
        "vs_one_process.server_cpu_ms_per_login",
        "node_cpu_ms_per_login",
        "redis_cpu_ms_per_login",
        "redis_fraction_of_server_cpu",
        "cpu.server_cpu_share",
        "cpu.redis_cpu_share",
        "cpu.server_runqueue_wait_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
        "workers.split",
    ),
    "cluster-durable": (
        "acked_per_s",
        "vs_one_process.acked_per_s",
        "ack_latency_ms.p50",
        "ack_latency_ms.p99",
        "stored_after_stop",
        "server_cpu_us_per_ack",
        "vs_one_process.server_cpu_us_per_ack",
        "node_cpu_us_per_ack",
        "redis_cpu_us_per_ack",
        "redis_fraction_of_server_cpu",
        "cpu.server_cpu_share",
        "cpu.redis_cpu_share",
        "cpu.server_runqueue_wait_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
        "workers.split",
    ),
    "peers": (
        "deliveries_per_s",
        "vs_ngircd.deliveries_per_s",
        "server_cpu_us_per_delivery",
        "vs_ngircd.server_cpu_us_per_delivery",
        "latency_ms.p50",
        "latency_ms.p99",
        "vs_ngircd.latency_ms_p99",
        "latency_ms.max",
        "lost",
        "generator_cpu_us_per_delivery",
        "cpu.server_cpu_share",
        "cpu.generator_cpu_share",
        "cpu.other_cpu_share",
    ),
    "freeze": (
        "ping_rtt_ms.p50",
        "ping_rtt_ms.p99",
        "ping_rtt_ms.max",
        "pings_unanswered",
        "attacker.frames_sent",
        "attacker.frames_received",
        "attacker.connections",
        "cut_off.flood",
        "cut_off.slow_consumer",
        "cpu.server_cpu_share",
        "cpu.attacker_cpu_share",
        "cpu.other_cpu_share",
        "loadavg_1min.before",
    ),
}


def lookup(results: dict[str, Any], path: str) -> Any:
    value: Any = results
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def evaluate(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target that applies to ``record``, with its value and whether it is met."""
    verdicts = []
    for target in TARGETS:
        if target.key != record.get("target_key"):
            continue
        value = lookup(record["results"], target.figure)
        verdicts.append(
            {
                "figure": target.figure,
                "target": target.describe(),
                "value": value,
                "met": isinstance(value, int | float) and target.met(value),
            }
        )
    return verdicts


def _format(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def rows(records: Iterable[dict[str, Any]]) -> list[tuple[str, str, str, str, str]]:
    """(record, figure, value, target, verdict) for every headline figure and target."""
    table = []
    for record in records:
        targets = {verdict["figure"]: verdict for verdict in record.get("targets", [])}
        figures = list(HEADLINES.get(record["scenario"], ()))
        figures += [figure for figure in targets if figure not in figures]
        name = record["name"] + (" (quick)" if record.get("quick") else "")
        for figure in figures:
            value = lookup(record["results"], figure)
            verdict = targets.get(figure)
            table.append(
                (
                    name,
                    figure,
                    _format(value),
                    verdict["target"] if verdict else "",
                    ("met" if verdict["met"] else "MISSED") if verdict else "",
                )
            )
            name = ""
    return table


def text_table(records: Iterable[dict[str, Any]]) -> str:
    header = ("scenario", "figure", "value", "target", "")
    body = rows(records)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * width for width in widths))
    for row in body:
        if row[0] and len(lines) > 2:
            lines.append("")
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(records: Iterable[dict[str, Any]]) -> str:
    lines = ["| scenario | figure | value | target | |", "|---|---|---:|---|---|"]
    for row in rows(records):
        cells = [row[0] and f"**{row[0]}**", f"`{row[1]}`", row[2], row[3], row[4]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_targets(records: Iterable[dict[str, Any]]) -> str:
    """One row per target of issues 5, 9, 12 and 14: the figure measured, the bound, met or
    not."""
    lines = ["| scenario | figure | measured | target | |", "|---|---|---:|---|---|"]
    for record in records:
        for verdict in record.get("targets", []):
            lines.append(
                f"| {record['name']} | `{verdict['figure']}` | {_format(verdict['value'])}"
                f" | {verdict['target']} | {'met' if verdict['met'] else '**missed**'} |"
            )
    if len(lines) == 2:
        lines.append("| (none: a quick run, or no scenario with targets) | | | | |")
    return "\n".join(lines)
