"""The paper's studies as run-config switches (issue 12): maps for other classes than the label
(Table A.9), no input normalisation (A.14), several layers of one model (A.13), the seeded,
class-balanced 1,000-image subset, and several settings of one method in one run (Tables 6, A.12).
Rows say which setting produced them; resume and the run fingerprint know them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from opticam_core import explain, load_model
from opticam_core.metrics import compute, preprocess
from pipeline import evaluate
from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_config
from pipeline.evaluate import Evaluator
from pipeline.fingerprint import changes, fingerprints
from pipeline.images import decode_image
from pipeline.job import balanced_subset, existing_rows, select_samples
from pipeline.schema import RESULTS, SAMPLES
from tests._samples import TOY_MODEL, photo_rows, toy_config, write_samples


def cfg(**changes) -> dict:
    base = toy_config("/data/toy", "/tmp/out", methods={"fakecam": {}, "gradcam": {}})
    base["metrics"] = {"classification": {}}
    return {**base, **changes}


def errors_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    return str(info.value)


# ------------------------------------------------------------------------------------------
# The config: each switch, and each bad input named at --check


def test_targets_default_to_the_label_and_bad_ones_are_named():
    assert load_config(cfg()).targets == ("label",)
    assert load_config(cfg(targets=["label", "top1", "top2", "least"])).targets == ("label", "top1", "top2", "least")
    msg = errors_of(cfg(targets=["label", "top7"]))
    assert "targets[1]" in msg and "top7" in msg and "'label', 'top1', 'top2', 'least'" in msg
    assert "names a target twice" in errors_of(cfg(targets=["top1", "top1"]))
    assert "targets" in errors_of(cfg(targets=[]))


def test_bad_study_settings_fail_check_naming_the_field(tmp_path, capsys):
    raw = cfg(targets=["top7"],
              models=[{**TOY_MODEL, "layer": None, "layers": ["bn2", "blocks.99"]},
                      {**TOY_MODEL, "key": "both", "layers": ["bn2"]}],
              methods={"gradcam": {}, "opticam:fast": {"iterationz": 3}, "opticam:x y": {}, "nope:diff": {}},
              datasets=[{"name": "toy", "uri": "/data/toy", "subset": {"size": 0}}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(path), "--check"]) == 2
    err = capsys.readouterr().err
    assert "targets[0]" in err and "top7" in err
    assert "models[0].layers[1]: 'blocks.99' is not a module of 'test_efficientnet'" in err
    assert "blocks.0" in err  # what it could have been
    assert "models[1]: give `layer` or `layers`, not both" in err
    assert "methods.opticam:fast.iterationz: unknown field" in err
    assert "methods.opticam:x y: a variant is `opticam:NAME`" in err
    assert "methods.nope:diff: unknown method" in err
    assert "datasets[0].subset.size" in err


def test_a_layer_the_network_lacks_is_refused_before_the_cluster():
    assert "models[0].layer: 'features.99' is not a module of 'vgg16'" in errors_of(
        cfg(models=[{"name": "vgg16", "layer": "features.99"}]))
    load_config(cfg(models=[{"name": "vgg16", "layers": ["features.42", "features.6"]}]))  # no weights fetched


def test_layers_expand_into_one_plan_per_layer():
    c = load_config(cfg(models=[{**TOY_MODEL, "layer": None, "layers": ["bn2", "conv_head"]}]), run_id="r")
    assert [(m.key, m.layer) for _, m in c.pairs()] == [("test_efficientnet@bn2", "bn2"),
                                                        ("test_efficientnet@conv_head", "conv_head")]
    prints = fingerprints(c)
    assert prints["toy/test_efficientnet@bn2/gradcam"]["models[test_efficientnet@bn2].layer"] == "bn2"
    assert "toy/test_efficientnet@conv_head/fakecam" in prints
    msg = errors_of(cfg(models=[{**TOY_MODEL, "layer": None, "layers": ["bn2", "conv_head"]},
                                {**TOY_MODEL, "layer": None, "layers": ["conv_head"]}]))
    assert "models[1].key: 'test_efficientnet@conv_head' is used twice" in msg
    assert "names a layer twice" in errors_of(cfg(models=[{**TOY_MODEL, "layer": None, "layers": ["bn2", "bn2"]}]))


def test_normalize_false_has_its_own_key_and_fingerprint():
    c = load_config(cfg(models=[dict(TOY_MODEL), {**TOY_MODEL, "normalize": False}]), run_id="r")
    assert [m.key for _, m in c.pairs()] == ["test_efficientnet", "test_efficientnet-unnormalized"]
    prints = fingerprints(c)
    assert prints["toy/test_efficientnet-unnormalized/gradcam"]["models[test_efficientnet-unnormalized].normalize"] \
        is False
    assert "models[test_efficientnet].normalize" not in prints["toy/test_efficientnet/gradcam"]  # runs before stay valid
    # the same key with normalisation switched off is a change, not an addition
    off = load_config(cfg(models=[{**TOY_MODEL, "key": "test_efficientnet", "normalize": False}]), run_id="r")
    found = changes(prints, fingerprints(off))
    assert {(x.field, x.old, x.new) for x in found} == {("models[test_efficientnet].normalize", None, False)}


def test_normalize_false_feeds_the_network_raw_pixels():
    x = torch.rand(2, 3, 64, 64)
    raw = load_model("efficientnet_lite0", normalize=False)
    usual = load_model("efficientnet_lite0")
    with torch.no_grad():
        assert torch.equal(raw.model(x), raw.model.net(x))
        assert torch.allclose(usual.model(x), usual.model.net((x - usual.model.mean) / usual.model.std))
        assert not torch.allclose(raw.model(x), usual.model(x), atol=1e-3)
    assert raw.info["normalize"] is False and usual.info["normalize"] is True


def test_variants_take_their_base_methods_options():
    c = load_config(cfg(methods={"opticam": {"iterations": 3}, "opticam:diff": {"objective": "diff", "iterations": 3},
                                 "gradcam": {}}), run_id="r")
    resolved = c.resolved_methods()
    assert resolved["opticam:diff"]["objective"] == "diff" and resolved["opticam"]["objective"] == "mask"
    assert "methods.opticam:diff.objective" in fingerprints(c)["toy/test_efficientnet/opticam:diff"]
    assert "objective" in errors_of(cfg(methods={"opticam:bad": {"objective": "maximise"}}))


# ------------------------------------------------------------------------------------------
# The subset


def labelled(n_classes: int, per_class: int):
    ids = [f"s{c:03d}-{k:02d}" for c in range(n_classes) for k in range(per_class)]
    return ids, [int(s[1:4]) for s in ids]


def test_subset_is_balanced_deterministic_and_seeded():
    ids, labels = labelled(7, 9)
    a = balanced_subset(ids, labels, 30, seed=0)
    assert len(a) == len(set(a)) == 30 and a == sorted(a)
    counts = np.bincount([int(s[1:4]) for s in a], minlength=7)
    assert counts.max() - counts.min() <= 1  # 30 = 4·7 + 2
    assert balanced_subset(ids, labels, 30, seed=0) == a
    order = np.random.default_rng(3).permutation(len(ids))
    assert balanced_subset([ids[i] for i in order], [labels[i] for i in order], 30, seed=0) == a
    assert balanced_subset(ids, labels, 30, seed=1) != a
    # one per class when the size is the number of classes (the paper's 1,000 of 1,000 classes)
    assert sorted(int(s[1:4]) for s in balanced_subset(ids, labels, 7, seed=5)) == list(range(7))
    # a class that runs out leaves its share to the others
    few_ids, few_labels = ids[:2] + ids[9:], labels[:2] + labels[9:]
    assert len(balanced_subset(few_ids, few_labels, 40, seed=0)) == 40
    assert len(balanced_subset(ids, labels, 1000, seed=0)) == len(ids)


def test_subset_ignores_the_shard_layout_and_comes_before_limit(tmp_path):
    rows = photo_rows(30, size=(8, 8))
    one = write_samples(tmp_path / "one", rows)
    many = tmp_path / "many"
    many.mkdir()
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(shuffled[k::3], schema=SAMPLES), many / f"part-{k}.parquet")
    ds = load_config(cfg(datasets=[{"name": "toy", "uri": str(one), "subset": {"size": 12, "seed": 4}}])).datasets[0]
    chosen = select_samples(ds, str(one)).to_pylist()
    assert chosen == select_samples(ds, str(many)).to_pylist() and len(chosen) == 12
    counts = np.bincount([r["label"] for r in rows if r["sample_id"] in chosen], minlength=10)
    assert sorted(counts.tolist()) == [1] * 8 + [2] * 2  # 10 classes of 3
    limited = ds.model_copy(update={"limit": 5})
    assert select_samples(limited, str(many)).to_pylist() == chosen[:5]
    prints = fingerprints(load_config(cfg(datasets=[{"name": "toy", "uri": str(one), "subset": {"size": 12}}]),
                                      run_id="r"))
    assert prints["toy/test_efficientnet/gradcam"]["datasets[toy].subset.size"] == 12


# ------------------------------------------------------------------------------------------
# The actor: maps for the target's class, metrics on the label, variants with their options


@pytest.fixture(scope="module")
def studies():
    return Evaluator(run_id="r", dataset="toy", model=TOY_MODEL, device="cpu", targets=["label", "top2", "least"],
                     methods={"gradcam": {}, "opticam": {"iterations": 2},
                              "opticam:diff": {"iterations": 2, "objective": "diff"}},
                     metrics={"classification": {}})


def png(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row.map_png))) / 255.0


def test_maps_for_the_target_class_metrics_on_the_label(studies):
    rows = photo_rows(3, seed=2)
    out = studies(pa.Table.from_pylist(rows, schema=SAMPLES))
    assert out.schema.equals(RESULTS)
    df = out.to_pandas()
    assert len(df) == 3 * 3 * 3 and df.error.isna().all() and df.normalized.all()
    df = df.set_index(["sample_id", "method", "target"])
    bundle = studies.bundle
    images = torch.stack([preprocess(decode_image(r["image"])) for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    with torch.no_grad():
        logits = bundle.model(images)
    second, least = logits.topk(2, dim=1).indices[:, 1], logits.argmin(1)
    assert not torch.equal(second, labels)
    direct = {"label": explain(bundle, images, labels, "gradcam").maps,
              "top2": explain(bundle, images, second, "gradcam").maps}
    on_label = compute(bundle, images, labels, direct["top2"], which={"classification": {}})
    for i, r in enumerate(rows):
        sid = r["sample_id"]
        assert df.loc[(sid, "gradcam", "label")].target_class == r["label"]
        assert df.loc[(sid, "gradcam", "top2")].target_class == second[i]
        assert df.loc[(sid, "gradcam", "least")].target_class == least[i]
        for target, maps in direct.items():
            assert np.abs(png(df.loc[(sid, "gradcam", target)]) - maps[i].numpy()).max() <= 0.5 / 255 + 1e-6
        top2 = df.loc[(sid, "gradcam", "top2")]
        # AD/AG/AI ingredients: the label's probability, on x and on x ⊙ S for the top-2 map
        assert top2.label == r["label"] and top2.p == pytest.approx(df.loc[(sid, "gradcam", "label")].p)
        assert top2.o == pytest.approx(on_label["o"][i].item(), rel=1e-4, abs=1e-6)
    assert not np.allclose(png(df.loc[(rows[0]["sample_id"], "gradcam", "label")]),
                           png(df.loc[(rows[0]["sample_id"], "gradcam", "top2")]))


def test_variants_run_with_their_own_options_never_twice_in_one_call(studies, monkeypatch):
    calls = []
    real = evaluate.explain

    def spy(bundle, images, targets, method, **options):
        calls.append((method, options))
        return real(bundle, images, targets, method, **options)

    monkeypatch.setattr(evaluate, "explain", spy)
    rows = photo_rows(2, seed=3)
    batch = pa.Table.from_pylist(rows, schema=SAMPLES).append_column("todo", pa.array(["opticam,opticam:diff"] * 2))
    df = studies(batch).to_pandas().set_index(["sample_id", "method"])
    assert sorted(set(df.index.get_level_values(1))) == ["opticam", "opticam:diff"]
    assert set(df.target) == {"label"}
    for method, options in calls:
        assert isinstance(method, list) and len(method) == len(set(method)) == 1
    assert [opts["opticam"]["objective"] for _, opts in calls] == ["mask", "diff"]
    sid = rows[0]["sample_id"]
    assert json.loads(df.loc[(sid, "opticam:diff")].options)["objective"] == "diff"
    images = torch.stack([preprocess(decode_image(r["image"])) for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    diff = explain(studies.bundle, images, labels, "opticam", iterations=2, objective="diff")
    assert np.abs(png(df.loc[(sid, "opticam:diff")]) - diff.maps[0].numpy()).max() <= 0.5 / 255 + 1e-6


def test_todo_names_method_and_target(studies):
    batch = pa.Table.from_pylist(photo_rows(2), schema=SAMPLES).append_column(
        "todo", pa.array(["gradcam|top2,gradcam", "opticam|least"]))
    df = studies(batch).to_pandas()
    assert sorted(zip(df.sample_id, df.method, df.target)) == [
        ("img0000", "gradcam", "label"), ("img0000", "gradcam", "top2"), ("img0001", "opticam", "least")]


def test_unnormalized_rows_say_so():
    ev = Evaluator(run_id="r", dataset="toy", model={**TOY_MODEL, "key": "raw", "normalize": False}, device="cpu",
                   methods={"fakecam": {}}, metrics={"classification": {}})
    assert (ev.bundle.model.std == 1).all() and (ev.bundle.model.mean == 0).all()
    df = ev(pa.Table.from_pylist(photo_rows(1), schema=SAMPLES)).to_pandas()
    assert df.normalized.tolist() == [False] and df.model.tolist() == ["raw"]


# ------------------------------------------------------------------------------------------
# Resume: rows written before targets existed count as the label's


def test_rows_without_a_target_column_are_the_labels(tmp_path):
    old = pa.table({"sample_id": ["a", "b"], "method": ["gradcam", "gradcam"], "error": [None, None]})
    pq.write_table(old, tmp_path / "old.parquet")  # the first file lacks the column
    pq.write_table(pa.table({"sample_id": ["a"], "method": ["gradcam"], "target": ["top1"],
                             "error": pa.array([None], pa.string())}), tmp_path / "z-new.parquet")
    done = existing_rows(str(tmp_path))
    assert sorted(zip(*(done.column(c).to_pylist() for c in ("sample_id", "target")))) == [
        ("a", "label"), ("a", "top1"), ("b", "label")]
    from pipeline.job import missing_work

    ds = load_config(cfg(datasets=[{"name": "toy", "uri": str(write_samples(tmp_path / "s", photo_rows(2)))}])).datasets[0]
    ids = {"a": "img0000", "b": "img0001"}
    renamed = done.set_column(0, "sample_id", pa.array([ids[s] for s in done.column("sample_id").to_pylist()]))
    # img0000 misses nothing: the rows before and after it stay aligned with their work
    assert missing_work(ds, ds.uri, ["gradcam"], renamed, ("label", "top1")).to_pydict() == {
        "sample_id": ["img0001"], "todo": ["gradcam|top1"]}


# ------------------------------------------------------------------------------------------
# One Ray job: every switch together; what a target added would compute


def test_a_study_run_resumes_per_target(tmp_path):
    from tests._peers import require

    ray = require("ray")
    from pipeline.job import missing_work, plan_uri, run, run_uri
    from pipeline.report.runs import open_run, read_table

    samples = str(write_samples(tmp_path / "samples", photo_rows(6)))
    raw = toy_config(samples, str(tmp_path / "out"), methods={"fakecam": {}, "gradcampp": {}, "gradcampp:eps": {"eps": 1e-3}})
    raw["metrics"] = {"classification": {}}
    raw["datasets"][0]["subset"] = {"size": 4, "seed": 1}
    raw["models"] = [{**TOY_MODEL, "layer": None, "layers": ["conv_head"]}]  # one plan: Ray's start is the cost
    raw["targets"] = ["label", "top1"]
    first = load_config(raw, run_id="s")
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        summary = run(first, log=lambda *_: None)
        assert summary.computed == 4 * 3 * 2 and summary.failed == 0
        assert set(summary.counts.values()) == {(4, 0)} and len(summary.counts) == 3 * 2
        assert run(first, log=lambda *_: None).computed == 0
    finally:
        ray.shutdown()
    # a target added to the config: exactly its rows are left to compute (the Evaluator reads
    # these `todo` entries: test_todo_names_method_and_target)
    [(ds, model, methods)] = first.plans()
    done = existing_rows(plan_uri(first.output, "s", ds.name, model.key))
    todo = missing_work(ds, samples, methods, done, ("label", "top1", "least"))
    assert todo.to_pydict() == {"sample_id": select_samples(ds, samples).to_pylist(),
                                "todo": ["fakecam|least,gradcampp|least,gradcampp:eps|least"] * 4}
    df = pads.dataset(run_uri(raw["output"], "s"), format="parquet", partitioning=None).to_table().to_pandas()
    assert len(df) == 4 * 3 * 2 and not df.duplicated(["sample_id", "method", "target"]).any()
    assert set(zip(df.model, df.layer)) == {("test_efficientnet@conv_head", "conv_head")}
    assert (Path(raw["output"]) / "run=s" / "dataset=toy" / "model=test_efficientnet@conv_head").is_dir()
    chosen = select_samples(load_config(raw).datasets[0], samples).to_pylist()
    assert set(df.sample_id) == set(chosen)
    top1 = df[df.target == "top1"]
    assert (top1.target_class == top1.pred).all()
    manifest = json.loads((Path(raw["output"]) / "run=s" / "_run.json").read_text())
    assert "toy/test_efficientnet@conv_head/gradcampp:eps/top1" in manifest["fingerprints"]
    assert manifest["config"]["datasets"][0]["subset"] == {"size": 4, "seed": 1}
    table = read_table(open_run(str(Path(raw["output"]) / "run=s")))
    assert table.num_rows == len(df)  # the report keeps every target's row


def test_the_report_names_and_orders_variants_after_their_method():
    from pipeline.report.tables import method_name, method_order

    assert method_name("opticam:diff") == "Opti-CAM (diff)" and method_name("opticam") == "Opti-CAM"
    assert method_order(["opticam:iomask", "opticam", "gradcam", "opticam:diff", "fakecam"]) == [
        "fakecam", "gradcam", "opticam", "opticam:diff", "opticam:iomask"]
