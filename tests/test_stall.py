"""The stall watchdog on a real local Ray: work that waits for resources nobody has fails the
run with the pending demand named; a long task with nothing waiting does not."""

from __future__ import annotations

import time

import pytest

from curation.config import load_config
from curation.session import ClusterStalled, watch_for_stalls

pytestmark = pytest.mark.integration


def _config(timeout_s: float):
    return load_config(data={"input": {"images": "/unused"}, "output": {"uri": "/unused"},
                             "cluster": {"stall_timeout_s": timeout_s}})


def test_a_request_nothing_can_run_fails_naming_the_demand(ray_local):
    import signal

    ray = ray_local
    # A library's SIGINT handler that does not raise (one did, earlier in the suite) must not
    # swallow the stall.
    previous = signal.signal(signal.SIGINT, lambda *args: None)
    waits = ray.remote(num_cpus=1, resources={"accelerator-nobody-has": 1})(lambda: 1)
    started = time.monotonic()
    ref = waits.remote()
    try:
        with pytest.raises(ClusterStalled) as info:
            with watch_for_stalls(_config(2)):
                ray.get(ref)
    finally:
        ray.cancel(ref, force=True)
        signal.signal(signal.SIGINT, previous)
    message = str(info.value)
    assert "accelerator-nobody-has" in message and "cluster.stall_timeout_s=2" in message
    assert "\n" not in message
    assert time.monotonic() - started < 60  # it fails; it does not wait forever


def test_a_long_task_with_nothing_waiting_is_not_a_stall(ray_local):
    ray = ray_local
    slow = ray.remote(num_cpus=1)(lambda: time.sleep(4) or "done")
    with watch_for_stalls(_config(1)):
        assert ray.get(slow.remote()) == "done"
