"""The command line: exit codes and one clear line for bad configs and unreachable inputs.

In process (``curation.cli.main``), except one smoke test of the real entry points as
subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

from curation.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Outcome:
    returncode: int
    stderr: str


@pytest.fixture
def cli(capsys):
    """``curation ARGS`` in this process: exit status and what it wrote to stderr."""

    def run(*args: str) -> Outcome:
        capsys.readouterr()
        code = main(list(args))
        return Outcome(code, capsys.readouterr().err)

    return run


def _run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def _write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _config_with_images(tmp_path, **sections) -> str:
    """A config over an existing (empty) images folder, plus the given sections."""
    images = tmp_path / "images"
    images.mkdir()
    return _write(tmp_path, {"input": {"images": str(images)}, "output": {"uri": str(tmp_path / "out")}, **sections})


def _one_error_line(proc) -> str:
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.integration
def test_entry_points_fail_a_bad_config_with_one_line_and_exit_2(tmp_path):
    """The real processes: ``python -m curation`` and the Ray job entrypoint."""
    config = _config_with_images(tmp_path, embedder={"modle": "resnet18"})
    line = _one_error_line(_run("-m", "curation", "run", "--config", config))
    assert "embedder.modle" in line and "unknown config key" in line
    missing = _write(tmp_path, {"input": {"images": str(tmp_path / "nope")}, "output": {"uri": str(tmp_path / "out")}})
    line = _one_error_line(_run("jobs/curate.py", "run", "--config", missing))
    assert "input.images" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_unknown_config_key_fails_with_one_line(tmp_path, cli):
    config = _config_with_images(tmp_path, embedder={"modle": "resnet18"})
    line = _one_error_line(cli("run", "--config", config))
    assert "embedder.modle" in line and "unknown config key" in line
    assert not (tmp_path / "out").exists()


def test_missing_input_path_fails_before_any_work(tmp_path, cli):
    config = _write(tmp_path, {"input": {"images": str(tmp_path / "nope")}, "output": {"uri": str(tmp_path / "out")}})
    line = _one_error_line(cli("run", "--config", config))
    assert "input.images" in line and "does not exist" in line and str(tmp_path / "nope") in line
    assert not (tmp_path / "out").exists()


def test_bad_override_value_names_the_key(tmp_path, cli):
    config = _config_with_images(tmp_path)
    line = _one_error_line(cli("run", "--config", config, "--set", "embedder.batch_size=lots"))
    assert "embedder.batch_size" in line and "expected int" in line


def test_unknown_model_is_a_config_error(tmp_path, cli):
    config = _config_with_images(tmp_path, embedder={"model": "resnet9000"})
    line = _one_error_line(cli("run", "--config", config))
    assert "unknown model 'resnet9000'" in line


def test_missing_weights_file_fails_before_any_work(tmp_path, cli):
    config = _config_with_images(tmp_path, embedder={"model": "resnet18", "weights": str(tmp_path / "w.pt")})
    line = _one_error_line(cli("run", "--config", config))
    assert "embedder.weights" in line and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_selection_naming_an_unknown_column_fails_before_any_work(tmp_path, cli):
    config = _config_with_images(tmp_path, embedder={"model": "thumbnail", "weights": "none"},
                                 selections=[{"name": "cats", "mode": "clean", "where": "lable == 'cat'"}])
    proc = cli("run", "--config", config)
    assert proc.returncode == 2  # after listing (which logs a progress line), before any work
    (line,) = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert line.startswith("curation: error: config key 'selections[0].where'") and "lable" in line
    assert not (tmp_path / "out").exists()
