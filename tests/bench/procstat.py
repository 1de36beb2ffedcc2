"""What the benchmark reads from /proc: a process's CPU time, the host's counters, RSS.

CPU time of a server comes from one of two clocks, chosen once per run:

- ``schedstat``: the first field of ``/proc/<pid>/task/<tid>/schedstat``, the
  nanoseconds each thread has run on a CPU (the scheduler's own accounting),
  summed over the process's threads. Preferred: nanosecond resolution.
- ``stat``: utime + stime of ``/proc/<pid>/stat`` in clock ticks
  (``os.sysconf('SC_CLK_TCK')``, usually 100 a second, so 10 ms steps). The
  fallback when the kernel has no schedstat (CONFIG_SCHED_INFO off).

Both are read for every window; the report says which one its figures use and
keeps the other for cross-checking.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _schedstat_ns(pid: int) -> dict[int, int] | None:
    """Nanoseconds on CPU of each live thread of ``pid``, or None without schedstat."""
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return None
    for tid in tids:
        try:
            out[int(tid)] = int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except FileNotFoundError:
            continue  # a thread that ended between listdir and read
        except (IndexError, ValueError):
            return None
    return out


def _stat_ticks(pid: int) -> int:
    """utime + stime of ``pid`` (all its threads, dead ones included) in clock ticks."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # fields 3.. of proc(5): comm may hold spaces
    return int(fields[11]) + int(fields[12])


@dataclass(frozen=True)
class CpuSample:
    """CPU time of one process at one instant, on both clocks."""

    schedstat_ns: dict[int, int] | None  # per thread id
    stat_ticks: int

    def seconds_since(self, earlier: CpuSample, clock: str) -> float:
        if clock == "schedstat":
            assert self.schedstat_ns is not None and earlier.schedstat_ns is not None
            # Per thread: a thread that ended in between would otherwise take its
            # whole run time out of a plain sum. Its share inside the window is
            # lost (the stat clock keeps it); the servers answer retrieve on one thread.
            ns = 0
            for tid, t in self.schedstat_ns.items():
                delta = t - earlier.schedstat_ns.get(tid, 0)
                ns += delta if delta >= 0 else t  # a new thread that got an old thread's id
            return ns / 1e9
        return (self.stat_ticks - earlier.stat_ticks) / CLK_TCK


def cpu_sample(pid: int) -> CpuSample:
    """Read both CPU clocks of ``pid`` now."""
    return CpuSample(_schedstat_ns(pid), _stat_ticks(pid))


def sched_counters(pid: int) -> dict[str, int]:
    """Context switches and CPU migrations of ``pid``'s main thread (``/proc/<pid>/sched``).

    Empty when the kernel has no CONFIG_SCHED_DEBUG. Many involuntary switches
    per request mean the server shared its CPU (with the load generator, when
    the scheduler put both on one core, or with a neighbour).
    """
    wanted = {"nr_voluntary_switches": "voluntary", "nr_involuntary_switches": "involuntary",
              "se.nr_migrations": "migrations"}
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/sched").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            out[wanted[key.strip()]] = int(float(value))
    return out


def best_cpu_clock(pid: int) -> str:
    """``schedstat`` when this kernel keeps it for ``pid``, else ``stat``."""
    return "schedstat" if _schedstat_ns(pid) else "stat"


@dataclass(frozen=True)
class HostSample:
    """The machine-wide counters of /proc/stat's ``cpu`` line, in ticks."""

    busy: int
    idle: int
    steal: int

    def since(self, earlier: HostSample, seconds: float) -> dict[str, float]:
        """Busy CPUs (other than steal) and stolen CPUs, averaged over ``seconds``."""
        def cpus(ticks: int) -> float:
            return round(ticks / CLK_TCK / seconds, 3)

        return {"busy_cpus": cpus(self.busy - earlier.busy),
                "steal_cpus": cpus(self.steal - earlier.steal)}


def host_sample() -> HostSample:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return HostSample(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of ``pid`` in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def machine() -> dict[str, object]:
    """What the report says about the host."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "clk_tck": CLK_TCK,
    }
