"""The run config is validated completely before any cluster work: every error names its field
and what the field allows, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "cluster" / "configs").glob("*.yaml"))

GOOD = {
    "output": "/tmp/out",
    "datasets": [{"name": "imagenet-val", "uri": "s3://b/samples/", "limit": None},
                 {"name": "kvasir", "uri": "/data/kvasir"}],
    "models": [{"name": "resnet50", "weights": "IMAGENET1K_V1"},
               {"name": "resnet50", "key": "kvasir-r50", "checkpoint": "s3://b/m.pt", "num_classes": 8,
                "layer": "layer4", "datasets": ["kvasir"]}],
    "methods": {"opticam": {"iterations": 100, "lr": 0.1}, "gradcam": {}, "scorecam": {}, "extremal": {}},
    "metrics": ["classification", "insertion_deletion", "localization", "box_study"],
    "compute": {"batch_size": 32, "actors": 4, "gpus_per_actor": 1},
    "save_maps": "png",
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.pairs()


def test_good_config_and_pairs():
    cfg = load_config(GOOD, run_id="nightly-1")
    assert cfg.run_id == "nightly-1" and cfg.output == "/tmp/out"
    # the Kvasir model runs on Kvasir only; the ImageNet model on both
    assert [(d.name, m.key) for d, m in cfg.pairs()] == [
        ("imagenet-val", "resnet50"), ("kvasir", "resnet50"), ("kvasir", "kvasir-r50")]
    assert cfg.metrics == {g: {} for g in GOOD["metrics"]}
    assert cfg.compute.actors == 4 and cfg.compute.gpus_per_actor == 1
    assert load_config(GOOD, output="s3://x/y").output == "s3://x/y"


def test_every_error_is_reported_at_once_with_field_and_choices():
    bad = {
        **GOOD,
        "datasets": [{"name": "a b", "uri": "x"}, {"name": "a b", "uri": "y", "limit": 0}],
        "models": [{"name": "resnet50", "num_classes": 1, "datasets": ["nope"], "color": "red"}],
        "methods": {"opticam": {"iterations": 100, "lr": 0.1, "momentum": 0.9}, "gradcamz": {}},
        "metrics": ["classification", "speed"],
        "compute": {"batch_size": 0, "actors": "four"},
        "save_maps": "jpeg",
        "extra": 1,
    }
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    for expected in [
        "config.extra: unknown field",
        "datasets[0].name: 'a b' may hold only",
        "datasets[1].name: 'a b' is used twice",
        "datasets[1].limit: must be an integer >= 1",
        "models[0].color: unknown field",
        "models[0].num_classes: must be an integer >= 2",
        "models[0].datasets: 'nope' is not a dataset of this run",
        "methods.opticam.momentum: unknown field; allowed:",
        "methods.gradcamz: unknown method; valid: fakecam, gradcam",
        "metrics.speed: unknown metric group; valid: classification",
        "compute.batch_size: must be an integer >= 1",
        "compute.actors: must be an integer >= 1",
        "save_maps: must be one of png, none",
    ]:
        assert expected in msg, f"missing {expected!r} in:\n{msg}"


def test_methods_options_are_checked_against_the_method():
    with pytest.raises(ConfigError, match="methods.scorecam.iterations: unknown field; allowed: batch_size, align_corners"):
        load_config({**GOOD, "methods": {"scorecam": {"iterations": 3}}})
    cfg = load_config({**GOOD, "methods": ["gradcam", "fakecam"]})
    assert cfg.methods == {"gradcam": {}, "fakecam": {}}


def test_missing_sections_and_files():
    with pytest.raises(ConfigError, match="datasets: must be a non-empty list"):
        load_config({"output": "x", "models": GOOD["models"], "methods": {"gradcam": {}}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("output: [unclosed")


def test_cli_check_and_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("output: /tmp/o\ndatasets: [{name: d, uri: /x}]\nmodels: [{name: resnet50}]\n"
                    "methods: {gradcam: {}}\n")
    assert cli_main(["run", str(good), "--check"]) == 0
    assert "config OK: 1 (dataset, model) plans × 1 methods" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: /tmp/o\ndatasets: [{name: d, uri: /x}]\nmodels: [{name: resnet50}]\n"
                   "methods: {gradcam: {eps: 1}}\n")
    assert cli_main(["run", str(bad), "--check"]) == 2
    assert "methods.gradcam.eps: unknown field" in capsys.readouterr().err
