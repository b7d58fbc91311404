"""Seconds and the driver's peak memory per phase of a run (``run.json`` → ``timings_s`` and
``driver_peak_bytes``), with a log line as each phase ends."""

from __future__ import annotations

import contextlib
import logging
import time
import ctypes
import pyarrow as pa

# The phase lines are the job's: operators (and tests) look for "curation.job: phase ... done".
log = logging.getLogger("curation.job")


class Clock:
    """Seconds and the driver's peak memory per phase, for run.json, and a log line as each ends."""

    def __init__(self):
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.peak_bytes: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        _return_freed_memory()
        _reset_peak_memory()
        t = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - t, 3)
        peak = _peak_memory()
        if peak:
            self.peak_bytes[name] = peak
        log.info("phase %s done in %.1fs (driver peak %.0f MiB)", name, self.timings[name], peak / 2**20)


def _return_freed_memory() -> None:
    """Hand the memory earlier phases freed back to the operating system (Arrow's allocator and
    glibc's malloc both keep freed pages for reuse): the driver's resident size between phases is
    then what it holds, not the high-water mark of the phase before."""
    pa.default_memory_pool().release_unused()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_memory() -> None:
    """Restart the kernel's peak-RSS counter of this process (Linux; elsewhere a no-op)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_memory() -> int:
    """This process's peak RSS since the last reset, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
