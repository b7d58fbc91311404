"""Inputs and names that escape their roots: run ids, directory links, odd file names."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from PIL import Image

from curation.config import ConfigError, load_config
from curation.io.filesystem import Resolver


def _images(folder, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (24, 24), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)).save(folder / f"{i:02d}.png")


def _config(tmp_path, images, **more):
    data = {"input": {"images": str(images)}, "output": {"uri": str(tmp_path / "out")},
            "embedder": {"model": "thumbnail", "weights": "none"}}
    for section, values in more.items():
        data.setdefault(section, {}).update(values)
    return load_config(data=data)


def _listed(config) -> list[str]:
    from curation.job import preflight

    plan = preflight(config, Resolver(config.storage))
    return plan.inputs["uri"].to_pylist()


@pytest.mark.parametrize("run_id", ["../escape", "a/b", "..", ".hidden", "latest", "embedding-store", "x" * 129,
                                    "night 1", "é"])
def test_a_run_id_must_be_one_plain_folder_name(tmp_path, run_id):
    with pytest.raises(ConfigError, match=r"config key 'output.run_id': expected one plain folder name"):
        _config(tmp_path, tmp_path, output={"run_id": run_id})


def test_a_run_id_that_escapes_is_exit_2_before_any_work(tmp_path, capsys):
    from curation.cli import main

    _images(tmp_path / "images", 2)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"input": {"images": str(tmp_path / "images")},
                                      "output": {"uri": str(tmp_path / "out"), "run_id": "../escape"}}))
    assert main(["run", "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output.run_id" in err[0] and "'../escape'" in err[0]
    assert not (tmp_path / "escape").exists() and not (tmp_path / "out").exists()
    assert _config(tmp_path, tmp_path, output={"run_id": "night-2026-11-30_1.b"}).output.run_id  # plain ids pass


def test_a_latest_that_names_a_path_is_never_followed(tmp_path):
    from curation.io.filesystem import resolve
    from curation.io.outputs import publish
    from curation.published_run import PublishedRun, latest_run_id

    resolve_run = PublishedRun.resolve

    assert latest_run_id(json.dumps({"run_id": "night-1"}).encode()) == "night-1"
    assert latest_run_id(json.dumps({"run_id": "../escape"}).encode()) is None
    (tmp_path / "escape").mkdir()
    (tmp_path / "escape" / "_SUCCESS").write_text("")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "latest").write_text(json.dumps({"run_id": "../escape"}))
    assert resolve_run(resolve(str(tmp_path / "out"))) is None
    with pytest.raises(ValueError, match="not a run folder name"):
        publish(resolve(str(tmp_path / "out")), "../escape")


def test_directory_links_are_not_followed_by_default(tmp_path, caplog):
    images = tmp_path / "images"
    _images(images / "img", 12)
    os.symlink("..", images / "img" / "loop")  # points up: followed, it would never end
    os.symlink("img/00.png", images / "alias.png")  # a link to a file is read like the file
    os.symlink("nowhere.png", images / "broken.png")
    uris = _listed(_config(tmp_path, images))
    assert len(uris) == 12 + 2
    assert not [u for u in uris if "loop" in u]
    assert "1 link(s) to directories not followed (input.follow_symlinks is false): img/loop" in caplog.text


def test_followed_links_list_each_real_folder_once_and_never_above_the_root(tmp_path):
    images = tmp_path / "images"
    _images(images / "img", 3)
    _images(tmp_path / "elsewhere" / "more", 2)
    os.symlink("..", images / "img" / "up")  # the root itself: not followed
    os.symlink("../..", images / "img" / "above")  # above the root: not followed
    os.symlink("img", images / "again")  # a folder listed already under its own path
    os.symlink(str(tmp_path / "elsewhere"), images / "shared")  # a real folder outside: followed once
    os.symlink("../shared", images / "img" / "shared-too")  # the same real folder: not twice
    uris = _listed(_config(tmp_path, images, input={"follow_symlinks": True}))
    rel = sorted(os.path.relpath(u, images) for u in uris)
    assert rel == ["img/00.png", "img/01.png", "img/02.png", "shared/more/00.png", "shared/more/01.png"]


def test_odd_names_and_a_byte_order_mark_keep_working(ray_local, tmp_path):
    from curation.job import run_job

    images = tmp_path / "images"
    _images(images / "img", 12)
    (images / "img" / "02.png").rename(images / "img" / "new\nline.png")
    os.symlink("..", images / "img" / "loop")
    os.symlink("nowhere.png", images / "broken.png")
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffpath,label\n".encode() + "".join(
        f"img/{i:02d}.png,{'ab'[i % 2]}\n" for i in (0, 1, 3)).encode())
    result = run_job(_config(tmp_path, images, input={"labels": str(labels)}))
    rows = {os.path.relpath(r["uri"], images): r for r in result.samples.to_pylist()}
    assert len(rows) == 13 == result.info.counts.inputs  # 12 images and the broken link; nothing under loop/
    assert rows["img/new\nline.png"]["status"] == "ok"
    assert rows["broken.png"]["status"] == "rejected" and rows["broken.png"]["reason"] == "missing: a broken symbolic link"
    assert [rows[f"img/{i:02d}.png"]["label"] for i in (0, 1, 3)] == ["a", "b", "b"]  # the BOM is not in the header
    assert all(r["dup_group"] is None for r in rows.values())  # no file was listed twice


def test_files_that_cannot_be_inputs_are_listed_with_the_reason(tmp_path):
    """A name that is not UTF-8 and a FIFO are rejected rows, not a crash and not left out;
    names with URI-like characters are plain files."""
    images = tmp_path / "images"
    _images(images, 2)
    for name in ("pct%20.png", "hash#1.png", "q?.png", " lead.png"):
        os.link(images / "00.png", images / name)
    with open(os.path.join(os.fsencode(images), b"bad\xff.png"), "wb") as fh:
        fh.write((images / "01.png").read_bytes())
    os.mkfifo(images / "fifo.png")
    from curation.job import preflight

    config = _config(tmp_path, images)
    inputs = preflight(config, Resolver(config.storage)).inputs.to_pylist()
    errors = {os.path.relpath(r["uri"], images): r["input_error"] for r in inputs}
    assert errors == {"00.png": None, "01.png": None, "pct%20.png": None, "hash#1.png": None, "q?.png": None,
                      " lead.png": None, "bad\\xff.png": "not a plain name: not valid UTF-8",
                      "fifo.png": "not an image: not a regular file (a FIFO, socket or device)"}


def test_a_key_with_dot_segments_is_its_own_rejected_input(tmp_path, monkeypatch):
    """Object stores allow keys such as ``a/../b.png``; normalised, it would be read as another
    object (``b.png``). It is listed under its own name and rejected."""
    import curation.io.inputs as inputs_io
    from curation.io.filesystem import ListedFile

    images = tmp_path / "images"
    _images(images, 1)
    root = str(images)
    monkeypatch.setattr(inputs_io, "list_files", lambda location, **_: [
        ListedFile(f"{root}/00.png", 10, 1), ListedFile(f"{root}/a/../00.png", 10, 1), ListedFile(f"{root}/./00.png", 10, 1)])
    config = _config(tmp_path, images)
    from curation.job import preflight

    inputs = preflight(config, Resolver(config.storage)).inputs.to_pylist()
    assert [(r["uri"][len(root):], r["input_error"]) for r in inputs] == [
        ("/00.png", None), ("/a/../00.png", "not a plain name: a '.' or '..' path segment"),
        ("/./00.png", "not a plain name: a '.' or '..' path segment")]
