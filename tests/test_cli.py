"""The command line: exit codes and one clear line for bad configs and unreachable inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def _write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_unknown_config_key_fails_with_one_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    config = _write(tmp_path, {"input": {"images": str(images)}, "output": {"uri": str(tmp_path / "out")},
                               "embedder": {"modle": "resnet18"}})
    proc = _run("-m", "curation", "run", "--config", config)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "embedder.modle" in lines[0] and "unknown config key" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_input_path_fails_before_any_work(tmp_path):
    config = _write(tmp_path, {"input": {"images": str(tmp_path / "nope")}, "output": {"uri": str(tmp_path / "out")}})
    proc = _run("jobs/curate.py", "run", "--config", config)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "input.images" in lines[0] and "does not exist" in lines[0] and str(tmp_path / "nope") in lines[0]
    assert not (tmp_path / "out").exists()


def test_bad_override_value_names_the_key(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    config = _write(tmp_path, {"input": {"images": str(images)}, "output": {"uri": str(tmp_path / "out")}})
    proc = _run("-m", "curation", "run", "--config", config, "--set", "embedder.batch_size=lots")
    assert proc.returncode == 2
    assert "embedder.batch_size" in proc.stderr and "expected int" in proc.stderr


def test_unknown_model_is_a_config_error(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    config = _write(tmp_path, {"input": {"images": str(images)}, "output": {"uri": str(tmp_path / "out")},
                               "embedder": {"model": "resnet9000"}})
    proc = _run("-m", "curation", "run", "--config", config)
    assert proc.returncode == 2
    assert "unknown model 'resnet9000'" in proc.stderr
