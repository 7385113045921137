"""docs/architecture.md's module table is true: each module imports exactly the
securechat modules the table lists, and the table lists every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "securechat"
ROW = re.compile(r"^\| `(?P<module>[\w_]+)\.py` \|.*\| (?P<imports>[^|]*)\|$")


def documented() -> dict[str, set[str]]:
    table: dict[str, set[str]] = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        if match := ROW.match(line):
            table[match["module"]] = set(re.findall(r"`([\w_]+)`", match["imports"]))
    return table


def imported(module: str) -> set[str]:
    """The securechat modules ``module`` imports (relative imports: the package's own)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is not None:
                names.add(node.module.split(".")[0])
            else:  # from . import tls
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("securechat"):
            names.add((node.module or "").removeprefix("securechat.").split(".")[0] or "?")
    return names


def test_the_table_lists_every_module() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__"}
    assert set(documented()) == modules


def test_each_module_imports_what_the_table_says() -> None:
    wrong = {
        module: {"table": sorted(listed), "code": sorted(imported(module))}
        for module, listed in documented().items()
        if imported(module) != listed
    }
    assert wrong == {}


def test_nothing_below_the_io_layer_names_a_transport_or_a_backend() -> None:
    chat = ["session", "hub", "rooms", "online", "ledger", "mailbox", "history", "delivery"]
    io = {"tls", "lines", "transport", "sqlite_store", "memory_store", "server", "client"}
    assert {module: imported(module) & io for module in chat} == {module: set() for module in chat}
