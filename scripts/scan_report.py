"""Judge a testssl.sh JSON report (--jsonfile-pretty or --jsonfile) for `make scan`.

Exit status 0 when no finding is MEDIUM, HIGH or CRITICAL (after the
exclusions below) and the scan ran to the end; 1 otherwise, after printing
the offending findings. Usage: scan_report.py REPORT.json

Exclusions: findings that only say the certificate comes from a private
development CA with no revocation infrastructure. Each one is excluded only
when both its id and its finding text match, so a different problem under
the same id still fails the scan. They are printed, never hidden.

The chain of trust is NOT excluded: scan.sh passes the dev CA to testssl
with --add-ca, so cert_chain_of_trust is checked against the CA that
securechat clients are given, and any failure there is a real one.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

FAILING = ("MEDIUM", "HIGH", "CRITICAL")
# testssl's ids get a suffix such as " <hostCert#1>" when a server has several certificates.
EXCLUDED: dict[str, tuple[re.Pattern[str], str]] = {
    "cert_revocation": (
        re.compile(r"Neither CRL nor OCSP URI provided"),
        "a private dev CA runs no CRL or OCSP service; securechat revokes access by"
        " removing the user from the config (SIGHUP) or by replacing the CA",
    ),
}
# Ids a complete scan always reports: their absence means testssl stopped early.
EXPECTED = ("TLS1_2", "TLS1_3", "cert_chain_of_trust", "cert_trust", "heartbleed")


def findings(node: Any) -> Iterator[dict[str, str]]:
    """Every {id, severity, finding} object in the report, wherever it is nested."""
    if isinstance(node, dict):
        if "id" in node and "severity" in node:
            yield node
        else:
            for value in node.values():
                yield from findings(value)
    elif isinstance(node, list):
        for value in node:
            yield from findings(value)


def base_id(finding_id: str) -> str:
    return finding_id.split(" ", 1)[0]


def exclusion(item: dict[str, str]) -> str | None:
    rule = EXCLUDED.get(base_id(item["id"]))
    if rule is None or not rule[0].search(item.get("finding", "")):
        return None
    return rule[1]


def show(item: dict[str, str]) -> str:
    return f"  {item['severity']:<8} {item['id']}: {item.get('finding', '')}"


def main(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as file:
            report = json.load(file)
    except (OSError, ValueError) as exc:
        print(f"scan: cannot read the testssl report {path}: {exc}", file=sys.stderr)
        return 1
    items = list(findings(report))
    if isinstance(report, dict):
        print(
            f"scan: testssl {str(report.get('version', '?')).split()[0]},"
            f" {report.get('openssl', '?')}, scan time {report.get('scanTime', '?')} s"
        )
    counts = Counter(item["severity"] for item in items)
    print(
        "scan: findings by severity: "
        + ", ".join(f"{severity} {count}" for severity, count in sorted(counts.items()))
    )

    problems = [item for item in items if item["severity"] in ("FATAL", "WARN")]
    excluded = [(item, reason) for item in items if (reason := exclusion(item))]
    failing = [item for item in items if item["severity"] in FAILING and exclusion(item) is None]
    missing = [
        wanted for wanted in EXPECTED if not any(base_id(item["id"]) == wanted for item in items)
    ]

    for item, reason in excluded:
        print(f"scan: excluded (inherent to a private dev CA):\n{show(item)}\n    why: {reason}")
    if problems:
        print("scan: testssl reported problems while scanning:")
        for item in problems:
            print(show(item))
    ok = True
    if missing:
        print(f"scan: FAIL: the report lacks {', '.join(missing)}: the scan did not complete")
        ok = False
    if any(item["severity"] == "FATAL" for item in items):
        print("scan: FAIL: testssl hit a fatal problem")
        ok = False
    if failing:
        print(f"scan: FAIL: {len(failing)} finding(s) of severity MEDIUM or higher:")
        for item in failing:
            print(show(item))
        ok = False
    if ok:
        print("scan: PASS: no finding of severity MEDIUM or higher (exclusions above)")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
