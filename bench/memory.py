"""Peak resident memory of a call, from the kernel's high-water mark (Linux: ``/proc/self/status``,
``/proc/self/clear_refs``)."""

from __future__ import annotations

from pathlib import Path


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_mib(fn) -> tuple[float, float]:
    """(peak RSS while ``fn`` runs, its growth over the RSS at the start), from the kernel's high-water
    mark, which is reset first."""
    Path("/proc/self/clear_refs").write_text("5")
    start = rss_kib("VmRSS")
    fn()
    peak = rss_kib("VmHWM")
    return peak / 1024, (peak - start) / 1024
