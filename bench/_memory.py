"""A benchmark process's own peak memory."""

from __future__ import annotations

from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Not `ru_maxrss`: Linux keeps it across exec, so a child
    started from a large parent reports the parent's peak; the kernel's high-water mark starts over."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: this benchmark needs Linux")
