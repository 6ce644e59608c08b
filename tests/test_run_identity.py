"""One run id = one configuration: a rerun that would change how a run's rows were made is
refused before any work, naming each changed field; `--replace METHOD` recomputes a method;
adding a dataset, a model or a method stays allowed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pyarrow.dataset as pads
import pytest

import opticam_core
from pipeline import fingerprint
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config
from pipeline.fingerprint import RunConflict, changes, fingerprints
from pipeline.job import run, run_uri
from tests._peers import require
from tests._samples import TOY_MODEL, photo_rows, toy_config, write_samples

ray = require("ray")

METHODS = {"fakecam": {}, "gradcam": {}, "opticam": {"iterations": 2}}
METRICS = {"classification": {}, "insertion_deletion": {"steps": 4}}


def config(samples: str, out: str, *, methods=None, metrics=None, models=None, datasets=None) -> dict:
    cfg = toy_config(samples, out, methods=methods or dict(METHODS))
    cfg["metrics"] = metrics or dict(METRICS)
    if models is not None:
        cfg["models"] = models
    if datasets is not None:
        cfg["datasets"] = datasets
    return cfg


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def rows(out: str, run_id: str = "r"):
    return pads.dataset(run_uri(out, run_id), format="parquet", partitioning=None).to_table().to_pandas()


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return str(write_samples(tmp_path_factory.mktemp("samples") / "toy", photo_rows(4)))


@pytest.fixture(scope="module")
def done(local_ray, samples, tmp_path_factory):
    """A finished run, kept pristine: each test works on its own copy."""
    out = tmp_path_factory.mktemp("done") / "out"
    summary = run(load_config(config(samples, str(out)), run_id="r"), log=lambda *_: None)
    assert summary.failed == 0 and summary.ok == 4 * len(METHODS)
    return out


@pytest.fixture
def copy(done, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(done, out)
    return out


# ------------------------------------------------------------------------------------------
# Refused reruns: each kind of change, named with its old and new value, nothing touched


def refused(cfg: dict, out: Path) -> str:
    before = snapshot(out)
    with pytest.raises(RunConflict) as info:
        run(load_config(cfg, run_id="r"), log=lambda *_: None)
    assert snapshot(out) == before, "a refused rerun touched the run"
    msg = str(info.value)
    assert "--run-id NEW_ID" in msg and "--replace" in msg  # the two ways out
    return msg


def test_changed_method_option_is_refused(samples, copy):
    msg = refused(config(samples, str(copy), methods={**METHODS, "opticam": {"iterations": 5}}), copy)
    assert "methods.opticam.iterations: 2 -> 5   (toy/test_efficientnet/opticam)" in msg
    assert "--replace opticam" in msg and "--replace gradcam" not in msg


def test_changed_model_is_refused(samples, copy):
    msg = refused(config(samples, str(copy), models=[{**TOY_MODEL, "layer": "conv_head"}]), copy)
    assert "models[test_efficientnet].layer: 'bn2' -> 'conv_head'" in msg
    assert "--replace fakecam --replace gradcam --replace opticam" in msg  # every method's rows changed


def test_changed_metric_option_is_refused(samples, copy):
    msg = refused(config(samples, str(copy), metrics={**METRICS, "insertion_deletion": {"steps": 8}}), copy)
    assert "metrics.insertion_deletion.steps: 4 -> 8" in msg
    msg = refused(config(samples, str(copy), metrics={"classification": {}}), copy)
    assert "metrics: ['classification', 'insertion_deletion'] -> ['classification']" in msg


def test_changed_preprocessing_is_refused(samples, copy, monkeypatch):
    # as if a release changed the model's resize (the geometry comes from the model's recipe)
    real = fingerprint.recipe
    monkeypatch.setattr(fingerprint, "recipe", lambda *a, **kw: dataclasses.replace(real(*a, **kw), resize=288))
    msg = refused(config(samples, str(copy)), copy)
    assert "preprocessing.resize: 256 -> 288" in msg


def test_changed_library_version_is_refused(samples, copy, monkeypatch):
    old = opticam_core.__version__
    monkeypatch.setattr(opticam_core, "__version__", "99.0")
    msg = refused(config(samples, str(copy)), copy)
    assert f"opticam_core: {old!r} -> '99.0'" in msg


def test_cli_exits_2_naming_the_change(samples, copy, tmp_path, capsys):
    yaml_path = tmp_path / "changed.yaml"  # JSON is YAML
    yaml_path.write_text(json.dumps(config(samples, str(copy), methods={**METHODS, "opticam": {"iterations": 5}})))
    before = snapshot(copy)
    assert cli_main(["run", str(yaml_path), "--run-id", "r"]) == 2
    err = capsys.readouterr().err
    assert "methods.opticam.iterations: 2 -> 5" in err and "--replace opticam" in err
    assert cli_main(["run", str(yaml_path), "--run-id", "r", "--check"]) == 2  # --check sees it too
    assert cli_main(["run", str(yaml_path), "--run-id", "r", "--replace", "layercam"]) == 2
    assert "--replace layercam: not a method of this config" in capsys.readouterr().err
    assert snapshot(copy) == before


# ------------------------------------------------------------------------------------------
# What stays allowed


def test_defaults_written_out_are_no_change(samples, copy):
    explicit = {"fakecam": {}, "gradcam": {}, "opticam": {"iterations": 2, "lr": 0.1, "objective": "mask"}}
    cfg = load_config(config(samples, str(copy), methods=explicit, models=[{**TOY_MODEL, "key": "test_efficientnet"}]),
                      run_id="r")
    assert run(cfg, log=lambda *_: None).computed == 0


def test_adding_a_method_a_model_or_a_dataset_is_allowed(samples, copy):
    more = config(samples, str(copy), methods={**METHODS, "layercam": {}},
                  models=[dict(TOY_MODEL), {**TOY_MODEL, "key": "second", "layer": "conv_head"}],
                  datasets=[{"name": "toy", "uri": samples}, {"name": "again", "uri": samples, "limit": 1}])
    summary = run(load_config(more, run_id="r"), log=lambda *_: None)
    # layercam on toy × first model (4), second model on toy (4 × 4), and both models on `again` (2 × 4)
    assert summary.computed == 4 + 16 + 8
    manifest = json.loads((copy / "run=r" / "_run.json").read_text())
    assert "again/second/layercam" in manifest["fingerprints"] and "toy/test_efficientnet/fakecam" in manifest["fingerprints"]


def test_replace_recomputes_the_method_and_nothing_else(samples, copy):
    before = rows(str(copy)).set_index(["sample_id", "method"]).created
    changed = load_config(config(samples, str(copy), methods={**METHODS, "opticam": {"iterations": 3}}), run_id="r")
    summary = run(changed, replace={"opticam"}, log=lambda *_: None)
    assert summary.computed == 4
    after = rows(str(copy))
    assert len(after) == 4 * len(METHODS) and not after.duplicated(["sample_id", "method"]).any()
    opt = after[after.method == "opticam"]
    assert (opt.iterations == 3).all() and opt.options.map(lambda s: json.loads(s)["iterations"]).eq(3).all()
    others = after[after.method != "opticam"].set_index(["sample_id", "method"]).created
    assert (others == before.loc[others.index]).all()  # untouched
    # the manifest records the new configuration: the same config again is no change
    assert run(changed, log=lambda *_: None).computed == 0


# ------------------------------------------------------------------------------------------
# The fingerprint itself (no Ray)


def test_fingerprint_resolves_what_the_model_will_be(samples):
    a = fingerprints(load_config(config(samples, "/tmp/x", models=[{"name": "resnet50"}]), run_id="r"))
    b = fingerprints(load_config(config(samples, "/tmp/x", models=[{"name": "resnet50", "layer": "layer4",
                                                                     "weights": "IMAGENET1K_V1"}]), run_id="r"))
    assert a == b  # the defaults spelled out
    fields = a["toy/resnet50/opticam"]
    assert fields["models[resnet50].layer"] == "layer4" and fields["preprocessing.size"] == [224, 224]
    assert fields["methods.opticam.lr"] == 0.1 and fields["metrics.insertion_deletion.steps"] == 4
    c = fingerprints(load_config(config(samples, "/tmp/x", models=[{"name": "resnet50", "checkpoint": "m.pt"}]),
                                 run_id="r"))
    found = changes(a, c)
    assert {(x.field, x.old, x.new) for x in found} == {
        ("models[resnet50].weights", "IMAGENET1K_V1", None), ("models[resnet50].checkpoint", None, "m.pt")}
    assert changes(a, c, ignore_methods={"fakecam", "gradcam", "opticam"}) == []


def test_a_run_without_recorded_fingerprints_is_accepted(samples, tmp_path):
    """Runs written before fingerprints existed: nothing to compare, so nothing to refuse."""
    cfg = load_config(config(samples, str(tmp_path)), run_id="old")
    manifest = tmp_path / "run=old" / "_run.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"run_id": "old", "config": {}}))
    from pipeline.job import check_configuration

    check_configuration(cfg)
    with pytest.raises(ConfigError, match="not a method of this config"):
        check_configuration(cfg, {"extremal"})


def test_the_demo_says_how_to_start_again(monkeypatch, tmp_path, capsys):
    import argparse

    from pipeline import demo, job

    def conflict(config, **_):
        raise RunConflict("run 'demo' already holds rows made with another configuration")

    monkeypatch.setattr(job, "run", conflict)
    args = argparse.Namespace(output=str(tmp_path), config=None, run_id="demo", fresh=False)
    assert demo.main(args) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "--fresh" in err
