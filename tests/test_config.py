from __future__ import annotations

import pytest

from curation.config import ConfigError, load_config, parse_class_balance

BASE = {"input": {"images": "/data"}, "output": {"uri": "/out"}}


def test_defaults_and_overrides():
    config = load_config(data=BASE, overrides=["embedder.batch_size=16", "scores.near_duplicate_cosine=0.9",
                                               "selections.0.budget=5"])
    assert config.embedder.batch_size == 16
    assert config.scores.near_duplicate_cosine == 0.9
    assert config.selections[0].budget == 5 and config.selections[0].mode == "representative"
    assert config.knn.k == 10


@pytest.mark.parametrize("data, message", [
    ({"output": {"uri": "/out"}}, "set one of input.images"),
    ({"input": {"images": "/d"}}, "'output.uri': required"),
    ({**BASE, "knn": {"k": 0}}, "'knn.k': must be >= 1"),
    ({**BASE, "knn": {"k": "ten"}}, "'knn.k': expected int"),
    ({**BASE, "scores": {"dark_highlights": 3}}, "'scores.dark_highlights': must be in [0, 1]"),
    ({**BASE, "selections": [{"name": "a", "mode": "best"}]}, "'selections[0].mode'"),
    ({**BASE, "selections": [{"name": "a", "mode": "edge_cases"}]}, "'selections[0].budget': required"),
    ({**BASE, "selections": [{"name": "a", "mode": "clean"}, {"name": "a", "mode": "clean"}]}, "duplicate selection"),
    ({**BASE, "selections": [{"name": "a", "mode": "representative", "budget": 3, "class_balance": "tempered:2"}]},
     "class_balance"),
    ({**BASE, "embedder": {"device": "tpu"}}, "'embedder.device'"),
    ({**BASE, "storage": {"endpoint": "x"}}, "unknown config key 'storage.endpoint'"),
])
def test_invalid_configs_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        load_config(data=data)
    assert message in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("knn.k='10'", "'knn.k': expected int, got '10'"),  # a quoted number stays text: no silent conversion
    ("knn.k=2.5", "'knn.k': expected int, got 2.5"),
    ("drift.enabled=1", "'drift.enabled': expected bool, got 1"),
    ("store.enabled=yes please", "'store.enabled': expected bool"),
    ("decode.background=[255, 255, x]", "'decode.background[2]': expected int"),
    ("report.map_method=tsne", "'report.map_method': expected umap | pca, got 'tsne'"),
    ("scores.copy_cosine=.inf", "'scores.copy_cosine': must be a finite number"),
    ("selections=oops", "'selections': expected a list"),
])
def test_types_are_strict_and_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(data=BASE, overrides=[override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_numbers_where_text_is_expected_are_the_text_they_spell():
    config = load_config(data=BASE, overrides=["output.run_id=2024", "knn.target_recall=1"])
    assert config.output.run_id == "2024" and config.knn.target_recall == 1.0
    assert isinstance(config.knn.target_recall, float)


def test_secrets_are_redacted_and_not_in_repr():
    config = load_config(data={**BASE, "storage": {"access_key_id": "AKIAXYZ", "secret_access_key": "s3cr3t"}})
    assert "s3cr3t" not in repr(config) and "AKIAXYZ" not in repr(config)
    dumped = config.to_dict()
    assert dumped["storage"]["secret_access_key"] == "***"


def test_class_balance_parsing():
    assert parse_class_balance("uniform") == 0.0
    assert parse_class_balance("proportional") == 1.0
    assert parse_class_balance("tempered:0.5") == 0.5
    with pytest.raises(ConfigError):
        parse_class_balance("tempered:x")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
