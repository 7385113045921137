"""What the benchmark knows about this machine and its processes, from /proc.

CPU times come from ``/proc/PID/stat`` (utime + stime, every thread of the
process, in clock ticks); memory from ``/proc/PID/status``; the machine's
own busy and steal time from ``/proc/stat``. Linux only, like the server's
production target.
"""

from __future__ import annotations

import os
import platform
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads, also finished ones)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces.
    return text.rsplit(")", 1)[1].split()


def _children_files(pid: int) -> list[int] | None:
    """The children of ``pid`` from ``/proc/PID/task/*/children``; None where the kernel
    has no such files (CONFIG_PROC_CHILDREN) or ``pid`` is gone."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found.extend(int(child) for child in (task / "children").read_text().split())
    except (OSError, ValueError):
        return None
    return found


def _parents() -> dict[int, int]:
    """Every process's parent, from one scan of ``/proc``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return parents


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (zombies included, until they are reaped):
    from ``/proc/PID/task/*/children`` where the kernel has it, else by scanning
    ``/proc`` for processes whose parent is ``pid``."""
    found = _children_files(pid)
    if found is None:
        found = [child for child, parent in _parents().items() if parent == pid]
    return sorted(set(found))


def tree_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time of ``pid`` and of every process below it, per process, as of now.

    Each process counts its own utime + stime and its reaped children's (cutime +
    cstime): a child that exited and was waited for (a worker the supervisor
    restarted) is still in the total, in its parent's figure, and a live child is
    counted once, in its own. The sum of the values is the tree's CPU time so far.
    The tree is found afresh at each call, so a child started since the last one is
    in it. Processes that vanish while they are read are left out.
    """
    parents: dict[int, int] | None = None
    found: dict[int, float] = {}
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = _stat_fields(current)
        except (OSError, IndexError):
            continue
        found[current] = sum(int(value) for value in fields[11:15]) / CLOCK_TICKS
        below = _children_files(current)
        if below is None:
            if parents is None:
                parents = _parents()
            below = [child for child, parent in parents.items() if parent == current]
        pending.extend(child for child in below if child not in found)
    return found


def run_delay_seconds(pid: int) -> float:
    """How long the threads of ``pid`` have been runnable but waiting for a CPU, so far
    (``/proc/PID/task/*/schedstat``, second field; threads that ended are not counted).
    0.0 for a process that is gone."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0.0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and VmSize of ``pid``, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize"):
            found[key] = int(value.split()[0])
    return found


@dataclass(frozen=True)
class MachineTimes:
    """Cumulative jiffies of all CPUs from ``/proc/stat``."""

    busy: int
    steal: int
    total: int

    @staticmethod
    def read() -> MachineTimes:
        with open("/proc/stat") as file:
            first = file.readline().split()
        values = [int(value) for value in first[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice;
        # guest time is already counted in user.
        idle = values[3] + values[4]
        steal = values[7] if len(values) > 7 else 0
        total = sum(values[:8])
        return MachineTimes(busy=total - idle - steal, steal=steal, total=total)

    def share_since(self, before: MachineTimes) -> dict[str, float]:
        """Busy and steal shares of all CPUs' time between ``before`` and this reading."""
        total = max(1, self.total - before.total)
        return {
            "machine_busy_share": round((self.busy - before.busy) / total, 3),
            "machine_steal_share": round((self.steal - before.steal) / total, 3),
        }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(repo: Path) -> str:
    """The commit the server code comes from, with ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "securechat"],  # noqa: S607
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def busy_neighbours() -> list[str]:
    """Other processes using CPU right now (over 0.5 s): they make the figures noisy."""
    me = os.getpid()

    def sample() -> dict[int, tuple[str, float]]:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                name = (entry / "comm").read_text().strip()
                found[int(entry.name)] = (name, cpu_seconds(int(entry.name)))
            except (OSError, IndexError, ValueError):
                continue
        return found

    before = sample()
    time.sleep(0.5)
    after = sample()
    busy = []
    for pid, (name, cpu) in after.items():
        if pid in before and cpu - before[pid][1] >= 0.05:
            busy.append(f"{name}[{pid}] {100 * (cpu - before[pid][1]) / 0.5:.0f}%")
    return busy


def describe(repo: Path) -> dict[str, object]:
    """The machine, the software and the code a result was measured with."""
    import trio  # the server's versions: the same interpreter runs it

    import securechat

    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "trio": trio.__version__,
        "openssl": ssl.OPENSSL_VERSION,
        "securechat": securechat.__version__,
        "revision": git_revision(repo),
        "loadavg_at_start": [round(value, 2) for value in os.getloadavg()],
        "busy_processes_at_start": busy_neighbours(),
        "executable": sys.executable,
    }
