"""Leave no Ray process behind when the driver of a local run is killed.

``ray.init()`` starts a local Ray whose processes are the driver's descendants; a clean exit
shuts them down, but a SIGKILL of the driver leaves some running (measured with Ray 2.60: the
dashboard and runtime-env agents, re-parented to init). This watchdog, started beside such a
local Ray, records the driver's descendants while it lives and kills the ones still running
(same pid *and* start time, so a reused pid is never hit) once it is gone.

    python -m curation.reaper <driver pid>
"""

from __future__ import annotations

import os
import signal
import sys
import time
import subprocess

POLL_S = 0.5


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat: start time in clock ticks
    except (OSError, IndexError, ValueError):
        return None


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                ppid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(name))
    return tree


def descendants(pid: int) -> dict[int, int]:
    """``{pid: start time}`` of every process below ``pid``."""
    tree, out, todo = _children(), {}, [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            started = _start_time(child)
            if started is not None and child not in out and child != os.getpid():
                out[child] = started
                todo.append(child)
    return out


def watch(driver: int) -> int:
    driver_started = _start_time(driver)
    seen: dict[int, int] = {}
    while _start_time(driver) == driver_started and driver_started is not None:
        seen.update(descendants(driver))
        time.sleep(POLL_S)
    killed = 0
    for pid, started in seen.items():
        if _start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def start(driver: int | None = None):
    """Start the watchdog for ``driver`` (this process by default); returns its Popen."""
    return subprocess.Popen([sys.executable, "-m", "curation.reaper", str(driver or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
