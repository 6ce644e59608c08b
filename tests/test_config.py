"""The run config is validated completely before any cluster work: every error names its field
and what the field allows, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config

# run configs only: finetune-*.yaml are `opticam finetune` configs (tests/test_finetune.py)
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "cluster" / "configs").glob("*.yaml")
                 if not p.name.startswith("finetune-"))

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
        "models": [{"name": "resnet50", "num_classes": 1, "datasets": ["nope"], "color": "red"},
                   {"name": "convnext_tiny"}],
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
        "extra: unknown field; allowed: run_id, output, datasets, models, methods, metrics, compute, save_maps",
        "datasets[0].name: may hold only letters, digits",
        "datasets[1].name: 'a b' is used twice",
        "datasets[1].limit: Input should be greater than or equal to 1, got 0 (allowed: null or integer ≥ 1)",
        "models[0].color: unknown field; allowed: name, key, weights",
        "models[0].num_classes: Input should be greater than or equal to 2, got 1",
        "models[0].datasets: 'nope' is not a dataset of this run",
        "models[1].layer: 'convnext_tiny' is not a built-in model (deit_base_patch16_224, efficientnet_lite0",
        "methods.opticam.momentum: unknown field; allowed: iterations, lr,",
        "methods.gradcamz: unknown method; valid: fakecam, gradcam",
        "metrics.speed: unknown metric group; valid: classification",
        "compute.batch_size: Input should be greater than or equal to 1, got 0",
        "compute.actors: Input should be a valid integer, got 'four'",
        "save_maps: Input should be 'png' or 'none', got 'jpeg'",
    ]:
        assert expected in msg, f"missing {expected!r} in:\n{msg}"


@pytest.mark.parametrize("method, options, expected", [
    ("opticam", {"iterations": "100"}, "methods.opticam.iterations: Input should be a valid integer, got '100' "
                                       "(allowed: integer ≥ 0)"),
    ("opticam", {"iterations": -5}, "methods.opticam.iterations: Input should be greater than or equal to 0, got -5"),
    ("opticam", {"lr": 0}, "methods.opticam.lr: Input should be greater than 0, got 0 (allowed: number > 0)"),
    ("opticam", {"normalization": "minmax"}, "methods.opticam.normalization: Input should be 'range', 'max' or "
                                             "'sigmoid', got 'minmax'"),
    ("opticam", {"early_stop": "no"}, "methods.opticam.early_stop: Input should be true or false, got 'no'"),
    ("extremal", {"areas": [1.5]}, "methods.extremal.areas[0]: Input should be less than 1, got 1.5 "
                                   "(allowed: number in (0, 1))"),
    ("extremal", {"iterations": 0}, "methods.extremal.iterations: Input should be greater than or equal to 1"),
    ("scorecam", {"batch_size": 2.5}, "methods.scorecam.batch_size: Input should be a valid integer"),
])
def test_option_values_are_typed(method, options, expected):
    """What used to pass --check and then fail every row on the cluster."""
    with pytest.raises(ConfigError) as info:
        load_config({**GOOD, "methods": {method: options}})
    assert expected in str(info.value), str(info.value)


def test_metric_options_are_typed_per_group():
    with pytest.raises(ConfigError) as info:
        load_config({**GOOD, "metrics": {"insertion_deletion": {"steps": 0}, "localization": {"steps": 56},
                                         "box_study": {"batch_size": -1}}})
    msg = str(info.value)
    assert "metrics.insertion_deletion.steps: Input should be greater than or equal to 1, got 0" in msg
    assert "metrics.localization.steps: unknown field; allowed: tolerance, thresholds, connectivity" in msg
    assert "metrics.box_study.batch_size: Input should be greater than or equal to 1, got -1" in msg
    cfg = load_config({**GOOD, "metrics": {"insertion_deletion": {"steps": 56}, "localization": None}})
    assert cfg.metrics == {"insertion_deletion": {"steps": 56}, "localization": {}}
    assert cfg.resolved_metrics()["insertion_deletion"]["steps"] == 56
    assert cfg.resolved_metrics()["localization"]["tolerance"] == 15


def test_options_keep_what_was_given_and_resolve_the_rest():
    cfg = load_config({**GOOD, "methods": {"extremal": {"areas": 0.05}, "opticam": {"betas": [0.8, 0.9]}}})
    assert cfg.methods == {"extremal": {"areas": [0.05]}, "opticam": {"betas": [0.8, 0.9]}}
    resolved = cfg.resolved_methods()
    assert resolved["extremal"]["iterations"] == 800 and resolved["opticam"]["lr"] == 0.1


def test_missing_sections_and_files():
    with pytest.raises(ConfigError, match="datasets: is required"):
        load_config({"output": "x", "models": GOOD["models"], "methods": {"gradcam": {}}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/run.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("output: [unclosed")
    # YAML text longer than a file name may be is still YAML text, not an OSError
    text = "# " + "x" * 300 + "\noutput: o\ndatasets: [{name: d, uri: u}]\nmodels: [{name: resnet50}]\nmethods: [gradcam]\n"
    assert load_config(text).output == "o"


def test_cli_check_and_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("output: /tmp/o\ndatasets: [{name: d, uri: /x}]\nmodels: [{name: resnet50}]\n"
                    "methods: {gradcam: {}}\n")
    assert cli_main(["run", str(good), "--check"]) == 0
    assert "config OK: 1 (dataset, model) plans, 1 (dataset, model, method) combinations" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: /tmp/o\ndatasets: [{name: d, uri: /x}]\nmodels: [{name: resnet50}]\n"
                   "methods: {gradcam: {eps: 1}}\n")
    assert cli_main(["run", str(bad), "--check"]) == 2
    assert "methods.gradcam.eps: unknown field; allowed: none" in capsys.readouterr().err


def test_uris_with_credentials_are_refused_without_quoting_them():
    secret = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYzEXAMPLEKEY"
    bad = {**GOOD, "output": f"s3://AKIDEXAMPLE:{secret}@bucket/out",
           "datasets": [{"name": "d", "uri": f"s3://me:{secret}@bucket/samples"}],
           "models": [{"name": "resnet50", "checkpoint": f"https://user:{secret}@host/m.pt"}]}
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    for where in ("output", "datasets[0].uri", "models[0].checkpoint"):
        assert f"{where}: credentials in a URI are not used" in msg
    assert secret not in msg and "AKIDEXAMPLE" not in msg
    assert GOOD["output"] == "/tmp/out"  # the caller's mapping is not modified


def test_a_model_can_run_a_subset_of_the_methods():
    cfg = load_config({**GOOD, "models": [{"name": "resnet50", "methods": ["gradcam", "opticam"]},
                                          {"name": "vgg16_bn"}]})
    assert [(m.key, methods) for _, m, methods in cfg.plans() if _.name == "kvasir"] == [
        ("resnet50", ["opticam", "gradcam"]), ("vgg16_bn", ["opticam", "gradcam", "scorecam", "extremal"])]
    with pytest.raises(ConfigError, match=r"models\[0\].methods: 'lime' is not a method of this run"):
        load_config({**GOOD, "models": [{"name": "resnet50", "methods": ["lime"]}]})


def test_a_method_paired_with_a_model_it_cannot_serve_is_refused():
    """E.g. the attention methods on a CNN: refused at --check instead of rows of errors."""
    from opticam_core.methods import REGISTRY, Requirement
    from opticam_core.methods.registry import register

    needs = Requirement("attention blocks", "vit_base_patch16_224, deit_base_patch16_224",
                        serves=lambda bundle: False, serves_recipe=lambda r: r.name.startswith(("vit", "deit")))

    @register("_attn", name="Attention-only", family="attention", rank=999, requires=needs)
    def attn(ctx):
        raise AssertionError("never run")

    try:
        methods = {"gradcam": {}, "_attn": {}}
        with pytest.raises(ConfigError) as info:
            load_config({**GOOD, "methods": methods, "models": [{"name": "resnet50"}, {"name": "vit_b"}]})
        msg = str(info.value)
        assert "methods._attn: needs attention blocks, which models[0] ('resnet50') does not have; " \
               "it accepts vit_base_patch16_224, deit_base_patch16_224" in msg
        assert "models[1]" not in msg
        cfg = load_config({**GOOD, "methods": methods,
                           "models": [{"name": "resnet50", "methods": ["gradcam"]}, {"name": "vit_b"}]})
        assert [methods for _, m, methods in cfg.plans()][:2] == [["gradcam"], ["gradcam", "_attn"]]
        from opticam_core import explain
        from tests import _toys

        with pytest.raises(ValueError, match="_attn needs attention blocks, which 'tiny_cnn' does not have"):
            explain(_toys.cnn_bundle(), _toys.images(1), _toys.targets(1), ["gradcam", "_attn"])
    finally:
        del REGISTRY["_attn"]


def test_metric_options_the_input_or_the_model_refute_are_refused_at_check():
    """AOPC's patches must tile the input (224 by default, or a dataset's preprocess size); the
    sanity check cannot randomise more blocks than the model has (ResNet50: 18)."""
    with pytest.raises(ConfigError) as info:
        load_config({**GOOD, "metrics": {"aopc": {"patch_size": 15}, "sanity": {"blocks": 19}}})
    msg = str(info.value)
    assert "metrics.aopc.patch_size: 15 does not divide the input size 224×224" in msg
    assert "metrics.sanity.blocks (models[0]): 19, but resnet50 has only 18 blocks" in msg
    ok = load_config({**GOOD, "metrics": {"aopc": {"patch_size": 16}, "sanity": {"blocks": 18}}})
    assert ok.metrics["aopc"] == {"patch_size": 16}
    resized = {**GOOD, "datasets": [{**GOOD["datasets"][0], "preprocess": {"resize": 160}}],
               "models": [GOOD["models"][0]], "metrics": {"aopc": {}}}
    with pytest.raises(ConfigError, match=r"metrics.aopc.patch_size: 14 does not divide the input size 160×160"):
        load_config(resized)
