"""The Ray internals the job uses where no public API serves (see the notes beside each use):
when an upgrade moves one, these fail by name instead of the job losing its stall watchdog's
progress or its view of the node types an autoscaler may add (both degrade silently at run
time by design)."""

from __future__ import annotations

import inspect


def test_ray_data_execution_callback_is_where_the_pipeline_takes_it():
    import ray.data
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    for hook in ("before_execution_starts", "on_execution_step", "after_execution_succeeds", "after_execution_fails"):
        assert callable(getattr(ExecutionCallback, hook, None)), hook
    # registered through the DataContext, as curation/pipeline.py does
    assert isinstance(ray.data.DataContext.get_current().custom_execution_callback_classes, list)


def test_the_streaming_executor_keeps_its_operators_in_topology():
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    source = inspect.getsource(StreamingExecutor)
    assert "self._topology" in source  # what _RayDataProgress walks for finished tasks
    from ray.data._internal.execution.interfaces.op_runtime_metrics import OpRuntimeMetrics

    assert "num_tasks_finished" in inspect.getsource(OpRuntimeMetrics)


def test_the_gcs_cluster_config_reader_exists():
    from ray._private.state import state

    assert callable(getattr(state, "get_cluster_config", None))
