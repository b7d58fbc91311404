"""The model registry: torchvision backbones with weights the test saves (file and s3://),
user TorchScript programs, the weight-free thumbnail, and the embedding stage."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torchvision

from curation.config import StorageConfig, load_config
from curation.embedders import EmbedderError, load_embedder
from curation.io.filesystem import Resolver
from curation.stages.embed import EmbedStage


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return str(path), model


def test_state_dict_from_file_is_loaded_with_its_values(resnet18_weights):
    path, reference = resnet18_weights
    net, identity = load_embedder("resnet18", path, image_size=64)
    assert identity.dim == 512 and identity.weights_sha256 and identity.semantic
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    reference.eval()
    with torch.inference_mode():
        torch.testing.assert_close(net(x), reference(x))


def test_state_dict_from_s3(s3, resnet18_weights):
    path, _ = resnet18_weights
    fs = s3.pyarrow_fs()
    fs.create_dir("models")
    with open(path, "rb") as src, fs.open_output_stream("models/resnet18.pt") as dst:
        dst.write(src.read())
    resolver = Resolver(StorageConfig(**s3.storage()))
    _, from_s3 = load_embedder("resnet18", "s3://models/resnet18.pt", image_size=64, resolver=resolver)
    _, from_file = load_embedder("resnet18", path, image_size=64)
    assert from_s3.weights_sha256 == from_file.weights_sha256


def test_wrong_weights_and_unknown_models_are_clear_errors(tmp_path, resnet18_weights):
    path, _ = resnet18_weights
    with pytest.raises(EmbedderError, match="does not load into resnet50"):
        load_embedder("resnet50", path, image_size=64)
    with pytest.raises(EmbedderError, match="unknown model"):
        load_embedder("resnet9000", "none", image_size=64)
    with pytest.raises(EmbedderError, match="cannot read"):
        load_embedder("resnet18", str(tmp_path / "missing.pt"), image_size=64)
    pickled = tmp_path / "pickled.pt"
    torch.save({"fc.weight": object()}, pickled)  # not loadable with weights_only=True
    with pytest.raises(EmbedderError):
        load_embedder("resnet18", str(pickled), image_size=64)


def test_random_weights_warn():
    _, identity = load_embedder("resnet18", "none", image_size=32)
    assert not identity.semantic and "random weights" in identity.warning


class TinyNet(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)


def test_user_torchscript_program_from_s3(s3):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(TinyNet()), buf)
    fs = s3.pyarrow_fs()
    fs.create_dir("models")
    with fs.open_output_stream("models/tiny.ts") as fh:
        fh.write(buf.getvalue())
    resolver = Resolver(StorageConfig(**s3.storage()))
    net, identity = load_embedder("torchscript", "s3://models/tiny.ts", image_size=32, resolver=resolver)
    assert identity.dim == 6 and identity.model == "torchscript"
    with pytest.raises(EmbedderError, match="needs the program file"):
        load_embedder("torchscript", "none", image_size=32)


def test_user_torch_export_program_from_file(tmp_path):
    program = torch.export.export(TinyNet(), (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    path = tmp_path / "tiny.pt2"
    torch.export.save(program, str(path))
    net, identity = load_embedder("exported", str(path), image_size=32)
    assert identity.dim == 6 and identity.weights_sha256
    stage = EmbedStage(model="exported", weights=str(path), image_size=32)
    emb = stage.embed(np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3)).astype(np.uint8))
    assert emb.shape == (5, 6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    with pytest.raises(EmbedderError, match="not a torch.export program"):
        load_embedder("exported", __file__, image_size=32)


def test_thumbnail_is_brightness_invariant_in_layout_and_separates_colour():
    stage = EmbedStage(model="thumbnail", weights="none", image_size=32)
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (32, 32, 3)).astype(np.uint8)
    brighter = np.clip(base.astype(int) + 20, 0, 255).astype(np.uint8)
    other_colour = base[..., ::-1].copy()
    emb = stage.embed(np.stack([base, brighter, other_colour]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    layout = 16 * 16 * 3  # the layout part is exactly brightness-invariant (weight 0.7) ...
    assert emb[0][:layout] @ emb[1][:layout] == pytest.approx(0.7, abs=1e-4)
    assert emb[0] @ emb[1] > 0.9  # ... the colour part moves a little
    assert emb[0] @ emb[2] < emb[0] @ emb[1]


def test_embed_stage_nulls_rejected_rows():
    stage = EmbedStage(model="resnet18", weights="none", image_size=32)
    batch = {"uri": np.array(["a", "b", "c"], object), "status": np.array(["ok", "rejected", "ok"], object),
             "reason": np.array([None, "corrupt: x", None], object),
             "pixels": np.random.default_rng(1).integers(0, 255, (3, 32, 32, 3)).astype(np.uint8)}
    table = stage(batch)
    assert table["embedding"].null_count == 1 and not table["embedding"][1].is_valid
    vectors = np.array([table["embedding"][i].as_py() for i in (0, 2)], np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert "pixels" not in table.column_names


def test_job_with_real_model_weights_from_s3(ray_local, s3, resnet18_weights, demo_set, tmp_path):
    """The real-model path end to end: resnet18 with a state_dict read from s3:// in the actor pool."""
    path, _ = resnet18_weights
    fs = s3.pyarrow_fs()
    fs.create_dir("models")
    with open(path, "rb") as src, fs.open_output_stream("models/r18.pt") as dst:
        dst.write(src.read())
    root, truth = demo_set
    from curation.job import run_job

    config = load_config(data={
        "input": {"images": os.path.join(root, "images", "tomato"), "labels": None},
        "storage": s3.storage(),
        "embedder": {"model": "resnet18", "weights": "s3://models/r18.pt", "image_size": 64, "batch_size": 16},
        "selections": [{"name": "clean", "mode": "clean"}],
        "output": {"uri": str(tmp_path / "out")},
    })
    result = run_job(config)
    assert result.run_info["embedder"]["dim"] == 512
    assert result.run_info["embedder"]["weights"] == "s3://models/r18.pt"
    assert result.run_info["counts"]["ok"] > 30
