"""Share of this virtual machine's CPU time taken by the host ("steal"), for benchmark reports.

On a shared cloud VM the hypervisor may run other guests on our vCPUs; the kernel counts that
time as *steal* (`/proc/stat`). Wall-time ratios measured while steal is high say more about
the neighbours than about the code, so the benchmarks print it next to their ratios. No
other dependency (the `pq` benchmark must not import TensorFlow).
"""
from __future__ import annotations

# /proc/stat "cpu" line fields: user nice system idle iowait irq softirq steal guest guest_nice;
# guest time is already counted in user, so the total is the first 8 fields.
_STEAL_FIELD = 7
_TOTAL_FIELDS = 8


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) CPU time over all vCPUs since boot in clock ticks; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) <= _TOTAL_FIELDS:
        return None
    ticks = [int(v) for v in fields[1:1 + _TOTAL_FIELDS]]
    return ticks[_STEAL_FIELD], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None
                ) -> float | None:
    """Fraction of all vCPU time between two `cpu_times()` readings that was stolen."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def describe(shares: list[float | None]) -> str:
    """'host steal per round: 1%, 0%, 35% ...' in round order; '' where steal is unknown."""
    if all(s is None for s in shares):
        return ""
    text = ", ".join("?" if s is None else f"{100 * s:.0f}%" for s in shares)
    return f"host steal per round: {text} (wall-time ratios are only meaningful near 0%)"
