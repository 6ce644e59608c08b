"""`opticam finetune` (issue 13, PAPER.md App. E): the config, the Kvasir split, the loop and its
resume, bad input, the shipped configs, the report's caption; then the whole path on a local Ray
(marked slow): generated datasets laid out like Kermany's chest_xray/ (2 classes) and Kvasir's
class folders (8 classes) go through `opticam ingest` and `opticam finetune` on 2 CPU workers,
and the checkpoint evaluates with `opticam run`.

The images are learnable by design: each class is a stripe direction (and, for 8 classes, a
colour), with random phase and noise, so a tiny network (timm's `test_resnet`, random weights, at
32×32) reaches full accuracy in a few epochs.
"""

from __future__ import annotations

import io
import json
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config import ConfigError
from pipeline.datasets.driver import IngestOptions, ingest
from pipeline.datasets.folder import KVASIR_SPLIT, split_counts, stratified_split
from pipeline.datasets.sources import Candidate, IngestError
from pipeline.finetune.config import load_config, parse_config
from pipeline.finetune.data import DataError, check_splits
from pipeline.schema import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "cluster" / "configs"
COLORS = [(220, 40, 40), (40, 200, 40), (40, 60, 220), (220, 200, 40)]
QUIET = {"log": lambda *_: None}


# --------------------------------------------------------------------------------------------
# Generated data


def stripes(cls: int, n_classes: int, rng, size: int = 32) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    s = (((x if cls % 2 else y) + rng.integers(0, 8)) // 4) % 2
    if n_classes == 2:
        img = np.stack([s * 200 + 30] * 3, -1)
    else:
        img = s[..., None] * np.array(COLORS[(cls // 2) % 4]) + (1 - s[..., None]) * 30
    return Image.fromarray(np.clip(img + rng.normal(0, 20, img.shape), 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_chest_xray(root: Path, counts=(("train", 60), ("val", 8), ("test", 20)), seed: int = 0) -> Path:
    """chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg, `n` per class and split."""
    rng = np.random.default_rng(seed)
    for split, n in counts:
        for cls, name in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / "chest_xray" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"IM-{i:04d}.jpeg").write_bytes(encoded(stripes(cls, 2, rng).convert("L"), "JPEG"))
    return root / "chest_xray"


def make_kvasir(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    from pipeline.datasets.folder import KVASIR_CLASSES

    rng = np.random.default_rng(seed)
    for cls, name in enumerate(KVASIR_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(encoded(stripes(cls, 8, rng), "JPEG"))
    return root


def write_samples(path: Path, rows: list[dict]) -> str:
    path.mkdir(parents=True, exist_ok=True)
    full = [{"dataset": "toy", "label_name": str(r["label"]), "boxes": [], "width": 32, "height": 32, **r} for r in rows]
    pq.write_table(pa.Table.from_pylist(full, schema=SAMPLES), path / "part-00000.parquet")
    return str(path)


def toy_rows(n_per_class: int, n_classes: int, split: str, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"sample_id": f"{split}/{c}/{i:03d}", "split": split, "label": c, "image": encoded(stripes(c, n_classes, rng))}
            for c in range(n_classes) for i in range(n_per_class)]


def small_config(data, output, *, classes: int = 2, workers: int = 1, epochs=(1, 3), **extra) -> dict:
    return {
        "name": "toy", "output": str(output), "data": data, "preprocess": {"resize": 32}, "seed": 0,
        "model": {"name": "test_resnet", "weights": None, "num_classes": classes, "layer": "layer4"},
        "stages": [{"train": "head", "lr": 0.01, "epochs": epochs[0], "batch_size": 16},
                   {"train": "all", "optimizer": "adam", "lr": 1e-3, "epochs": epochs[1], "batch_size": 16}],
        "compute": {"workers": workers}, **extra,
    }


# --------------------------------------------------------------------------------------------
# The config


def test_config_errors_name_every_field_at_once():
    raw = small_config("/data/s", "/out")
    raw["model"] = {"name": "resnet50", "num_classes": 1, "colour": "x"}
    raw["stages"] = [{"train": "head", "lr": -1, "epochs": 1}, {"train": "most", "lr": 1e-5, "epochs": 2, "optimizer": "rmsprop"}]
    raw["preprocess"] = {"resize": 224, "crop": 256}
    raw["augment"] = {"hflip": "sometimes"}
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    msg = str(err.value)
    for field in ("model.num_classes", "model.colour: unknown field", "stages[0].lr", "stages[1].train",
                  "stages[1].optimizer", "preprocess", "augment.hflip"):
        assert field in msg, (field, msg)


def test_config_cross_checks_and_shorthands():
    with pytest.raises(ConfigError, match=r"stages\[0\].batch_size: 15 does not split evenly across compute.workers 2"):
        parse_config(small_config("/d", "/o", workers=2) | {"stages": [{"train": "all", "lr": 1, "epochs": 1, "batch_size": 15}]})
    with pytest.raises(ConfigError, match=r"stages\[0\].momentum: applies to optimizer sgd only"):
        parse_config(small_config("/d", "/o") | {"stages": [{"train": "all", "optimizer": "adam", "lr": 1, "momentum": 0.5, "epochs": 1}]})
    with pytest.raises(ConfigError, match="no epochs to train"):
        parse_config(small_config("/d", "/o", epochs=(0, 0)))
    with pytest.raises(ConfigError, match="data.train: credentials in a URI"):
        parse_config(small_config({"train": "s3://AKIA:secret@b/x", "val": "/v", "test": "/t"}, "/o"))
    cfg = parse_config(small_config({"train": "/a", "val": {"uri": "/b", "split": "valid"}, "test": "/a"}, "/o"))
    assert (cfg.data.train.uri, cfg.data.train.split, cfg.data.val.split, cfg.data.test.split) == ("/a", "train", "valid", "test")
    assert parse_config(small_config("/one", "/o")).data.val.uri == "/one"
    # the stages' epochs are global: epoch k belongs to the stage it falls in
    c = parse_config(small_config("/d", "/o", epochs=(2, 3)))
    assert [c.stage_of(e) for e in range(5)] == [0, 0, 1, 1, 1] and c.epochs == 5
    # the paper's direct resize vs the evaluation's resize + crop
    assert c.preprocess.kwargs() == {"resize": (32, 32), "size": (32, 32)}
    assert parse_config(small_config("/d", "/o") | {"preprocess": {"resize": 256, "crop": 224}}).preprocess.kwargs() == \
        {"resize": 256, "size": (224, 224)}


def test_direct_resize_squashes_the_whole_image():
    """`resize: 224` (a pair to the core) keeps every pixel row and column: no crop."""
    import torch.nn.functional as F

    from opticam_core.transforms import preprocess

    img = torch.rand(3, 50, 120)
    out = preprocess(img, resize=(24, 24), size=(24, 24))
    ref = F.interpolate(img[None], size=(24, 24), mode="bilinear", align_corners=False, antialias=True)[0]
    torch.testing.assert_close(out, ref.clamp(0, 1))
    assert preprocess(img, resize=24, size=24).shape == (3, 24, 24)  # the evaluation's: crops the long side


PAPER = {  # PAPER.md "Medical recipe": stage-1 lr per (dataset, model)
    ("chestxray", "resnet50"): 1e-3, ("chestxray", "vgg16_bn"): 1e-3,
    ("kvasir", "resnet50"): 1e-4, ("kvasir", "vgg16_bn"): 5e-3,
}


@pytest.mark.parametrize("dataset,model", sorted(PAPER))
def test_shipped_configs_follow_the_papers_recipe(dataset, model):
    cfg = load_config(CONFIGS / f"finetune-{dataset}-{model}.yaml")
    assert cfg.model.name == model and cfg.model.weights == "default"
    assert cfg.model.num_classes == {"chestxray": 2, "kvasir": 8}[dataset]
    head, full = cfg.stages
    assert (head.train, head.lr) == ("head", PAPER[(dataset, model)])
    assert (full.train, full.optimizer, full.lr, full.momentum, full.epochs) == ("all", "sgd", 1e-5, 0.9, 50)
    assert (cfg.preprocess.resize, cfg.preprocess.crop) == (224, None)  # direct resize to 224×224
    assert not cfg.augment.hflip and not cfg.augment.vflip
    assert cfg.compute.gpus and cfg.output.startswith("s3://") and cfg.data.train.uri.startswith("s3://")
    # the evaluation config names the checkpoint this run writes, under the same model key
    run_cfg = yaml.safe_load((CONFIGS / f"{dataset}.yaml").read_text())
    [entry] = [m for m in run_cfg["models"] if m["name"] == model]
    assert entry["checkpoint"] == cfg.output.rstrip("/") + "/model.pt" and entry["key"] == cfg.model.key


def test_kuberay_manifest_runs_a_finetune_config():
    job = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob-finetune.yaml").read_text())
    evaluation = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["opticam", "finetune"] and "--resume" in argv  # a retried job continues
    config = ROOT / argv[2].removeprefix("/home/ray/opticam/")
    cfg = load_config(config)
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == evaluation["spec"]["rayClusterSpec"]["rayVersion"]
    gpus = sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["maxReplicas"]
               for g in cluster["workerGroupSpecs"])
    cpus = min(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in cluster["workerGroupSpecs"])
    assert gpus >= cfg.compute.workers and cpus >= cfg.compute.cpus_per_worker


# --------------------------------------------------------------------------------------------
# The Kvasir split


def _candidates(per_class: list[int]) -> list[Candidate]:
    return [Candidate(uri=f"/x/{c}/{i}", sample_id=f"c{c}/{i:04d}", split="all", label=c, label_name=str(c))
            for c, n in enumerate(per_class) for i in range(n)]


def test_stratified_split_is_exact_proportional_and_seeded():
    per_class = [1000] * 8
    out, left = stratified_split(_candidates(per_class), dict(KVASIR_SPLIT), seed=0)
    assert left == 0 and Counter(c.split for c in out) == KVASIR_SPLIT
    by = Counter((c.split, c.label) for c in out)
    assert all(by[("train", k)] == 750 and by[("val", k)] == 125 and by[("test", k)] == 125 for k in range(8))
    again, _ = stratified_split(list(reversed(_candidates(per_class))), dict(KVASIR_SPLIT), seed=0)
    assert [(c.sample_id, c.split) for c in again] == [(c.sample_id, c.split) for c in out]  # order-free
    other, _ = stratified_split(_candidates(per_class), dict(KVASIR_SPLIT), seed=1)
    assert [c.split for c in other] != [c.split for c in out]
    # uneven classes: exact totals, each class within one image of its share
    uneven = [37, 5, 120, 64, 9, 33, 80, 52]
    sizes = {"train": 300, "val": 50, "test": 40}
    out, left = stratified_split(_candidates(uneven), sizes, seed=3)
    assert Counter(c.split for c in out) == sizes and left == sum(uneven) - 390
    by = Counter((c.split, c.label) for c in out)
    for s, size in sizes.items():
        for k, n in enumerate(uneven):
            assert abs(by[(s, k)] - size * n / sum(uneven)) < 1, (s, k)
    assert len({c.sample_id for c in out}) == len(out)  # no image in two splits


def test_split_sizes_as_counts_or_fractions():
    assert split_counts({"train": 0.75, "val": 0.125, "test": 0.125}, 80) == {"train": 60, "val": 10, "test": 10}
    assert split_counts({"train": 6000, "val": 1000, "test": 1000}, 8000) == KVASIR_SPLIT
    with pytest.raises(IngestError, match="--split-sizes: 6000\\+1000\\+1000 = 8000 images asked for, only 100 listed"):
        split_counts(dict(KVASIR_SPLIT), 100)
    with pytest.raises(IngestError, match="fractions must add up to at most 1"):
        split_counts({"train": 0.9, "val": 0.2, "test": 0.1}, 100)


def test_ingest_kvasir_records_the_split_and_keeps_one_part(tmp_path):
    src = make_kvasir(tmp_path / "kvasir", per_class=10)
    full = ingest(IngestOptions("kvasir", str(src), str(tmp_path / "all")), **QUIET)
    assert full["split_sizes"] == {"train": 60, "val": 10, "test": 10} and full["split_seed"] == 0
    assert any("split 6:1:1" in w for w in full["warnings"])  # not the 8,000 images of Kvasir v2
    rows = pq.read_table(tmp_path / "all").to_pylist()
    assert Counter(r["split"] for r in rows) == {"train": 60, "val": 10, "test": 10}
    # --split test: the same test part as the full ingest (same seed and sizes)
    ingest(IngestOptions("kvasir", str(src), str(tmp_path / "test"), split="test"), **QUIET)
    part = {r["sample_id"] for r in pq.read_table(tmp_path / "test").to_pylist()}
    assert part == {r["sample_id"] for r in rows if r["split"] == "test"}
    sized = ingest(IngestOptions("kvasir", str(src), str(tmp_path / "s"), split_sizes={"train": 40, "val": 16, "test": 16},
                                 split_seed=5), **QUIET)
    assert sized["counts"]["written"] == 72 and any("8 images are in none" in w for w in sized["warnings"])
    with pytest.raises(IngestError, match="--split 'holdout'"):
        ingest(IngestOptions("kvasir", str(src), str(tmp_path / "x"), split="holdout"), **QUIET)
    with pytest.raises(IngestError, match="--split-sizes applies to kvasir and folder"):
        ingest(IngestOptions("chestxray", str(src), str(tmp_path / "y"), split_sizes={"train": 1, "val": 0, "test": 0}), **QUIET)


def test_ingest_cli_parses_split_sizes(tmp_path, capsys):
    from pipeline.cli import main

    src = make_kvasir(tmp_path / "kvasir", per_class=4)
    assert main(["ingest", "kvasir", str(src), "--output", str(tmp_path / "o"), "--split-sizes", "0.5,0.25,0.25",
                 "--split-seed", "2"]) == 0
    assert json.loads((tmp_path / "o" / "_ingest.json").read_text())["split_sizes"] == {"train": 16, "val": 8, "test": 8}
    with pytest.raises(SystemExit):
        main(["ingest", "kvasir", str(src), "--output", str(tmp_path / "p"), "--split-sizes", "6000,1000"])
    assert "expected three sizes" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Bad input, before and during training


def test_label_outside_num_classes_and_empty_split_are_errors_before_training(tmp_path):
    uri = write_samples(tmp_path / "s", toy_rows(3, 3, "train") + toy_rows(2, 2, "test"))
    cfg = parse_config(small_config(uri, tmp_path / "o"))
    with pytest.raises(DataError) as err:
        check_splits(cfg)
    msg = str(err.value)
    assert "data.train: 3 samples have labels outside model.num_classes 2" in msg and "label 2" in msg
    assert "data.val.split: no samples with split 'val'" in msg and "['test', 'train']" in msg
    missing = parse_config(small_config(str(tmp_path / "nowhere"), tmp_path / "o"))
    with pytest.raises(DataError, match="data.train.uri: no samples at"):
        check_splits(missing)


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from pipeline.cli import main

    uri = write_samples(tmp_path / "s", toy_rows(3, 3, "train"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(small_config(uri, tmp_path / "o")))
    assert main(["finetune", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("opticam finetune: error: cannot fine-tune") and "outside model.num_classes 2" in err
    path.write_text(yaml.safe_dump(small_config(uri, tmp_path / "o") | {"seed": "x"}))
    assert main(["finetune", str(path), "--check"]) == 2
    assert "seed:" in capsys.readouterr().err


def _local_run(cfg, **kw):
    from pipeline.finetune.train import LocalSession, run

    session = LocalSession("cpu", **kw)
    return run(cfg, session, log=lambda *_: None), session


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    rows = toy_rows(4, 2, "train") + toy_rows(2, 2, "val") + toy_rows(2, 2, "test")
    rows[0]["image"] = rows[0]["image"][: len(rows[0]["image"]) // 2]  # truncated: the header reads, the pixels do not
    rows[-1]["image"] = b"not an image"
    cfg = parse_config(small_config(write_samples(tmp_path / "s", rows), tmp_path / "o", epochs=(0, 1)))
    state, _ = _local_run(cfg)
    assert state["skipped"] == {"train": 1, "val": 0, "test": 1}
    assert state["history"][0]["images"] == 7
    assert int(state["test"]["confusion"].sum()) == 3
    # a split where nothing decodes is an error naming it
    for r in rows:
        if r["split"] == "val":
            r["image"] = b"junk"
    cfg = parse_config(small_config(write_samples(tmp_path / "t", rows), tmp_path / "o", epochs=(0, 1)))
    with pytest.raises(DataError, match=r"data.val: none of the split's images decode \(4 skipped\)"):
        _local_run(cfg)


def test_resume_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    """The loop's determinism: order, flips and dropout come from (seed, epoch[, rank]), the
    optimiser state travels in the checkpoint; stopping after epoch k and resuming changes nothing
    (bitwise on CPU). Stage 1 trains the head only: the rest of the network does not move."""
    rows = toy_rows(6, 2, "train") + toy_rows(2, 2, "val") + toy_rows(2, 2, "test")
    raw = small_config(write_samples(tmp_path / "s", rows), tmp_path / "o", epochs=(1, 2)) | {"augment": {"hflip": True}}
    cfg = parse_config(raw)
    from pipeline.finetune.train import LocalSession, build_model, run

    full, session = _local_run(cfg)
    assert [r["epoch"] for r in full["history"]] == [1, 2, 3]
    start = build_model(cfg, "cpu").net.state_dict()
    stopped = LocalSession("cpu")
    assert run(cfg, stopped, log=lambda *_: None, hooks={"stop_after": 1}) == {"stopped": 1}
    after_head = stopped.state["model"]
    assert all(torch.equal(after_head[k], v) for k, v in start.items() if not k.startswith("fc."))
    assert not torch.equal(after_head["fc.weight"], start["fc.weight"])
    resumed, _ = _local_run(cfg, state=stopped.state)
    assert resumed["resumed"] == [1] and [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert resumed["test"]["accuracy"] == full["test"]["accuracy"]


def test_output_of_another_run_is_refused_and_resume_checks_the_config(tmp_path):
    from pipeline.finetune.driver import CONFIG_FILE, FinetuneError, prepare_output

    cfg = parse_config(small_config("/d", tmp_path / "o"))
    assert prepare_output(cfg, resume=True) is None  # nothing there yet: --resume starts the run
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict()))
    with pytest.raises(FinetuneError, match="already holds a fine-tuning run; pass --resume"):
        prepare_output(cfg, resume=False)
    assert prepare_output(cfg, resume=True) is None
    changed = parse_config(small_config("/d", tmp_path / "o", workers=2) | {"seed": 7})  # compute may change
    with pytest.raises(FinetuneError, match=r"seed: 0 -> 7") as err:
        prepare_output(changed, resume=True)
    assert "compute" not in str(err.value)


def test_checkpoint_with_another_head_names_both_sizes(tmp_path):
    from opticam_core import load_model
    from opticam_core.models import ModelError

    tuned = load_model("test_resnet", weights=None, num_classes=2, layer="layer4")
    path = tmp_path / "model.pt"
    torch.save(tuned.model.net.state_dict(), path)
    with pytest.raises(ModelError, match=r"its classifier has 2 classes .*the model built here has 8.*num_classes=2"):
        load_model("test_resnet", checkpoint=str(path), num_classes=8, layer="layer4")


# --------------------------------------------------------------------------------------------
# The report's caption


def test_report_caption_puts_the_test_accuracy_beside_the_papers(tmp_path):
    from pipeline.report.finetuned import finetuned_captions

    for name, acc, dataset in (("cxr-r50", 0.8137, "chestxray"), ("kv-vgg", 0.9, "kvasir"), ("other", 0.5, "toy")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"test_accuracy": acc, "dataset": dataset, "model": {"num_classes": 3}}))
    manifest = {"config": {"models": [
        {"name": "resnet50", "key": "chestxray-resnet50", "checkpoint": str(tmp_path / "cxr-r50" / "model.pt")},
        {"name": "vgg16", "key": "kvasir-vgg16", "checkpoint": str(tmp_path / "kv-vgg" / "model.pt")},
        {"name": "test_resnet", "key": "t", "checkpoint": str(tmp_path / "other" / "model.pt"), "layers": ["layer3"]},
        {"name": "resnet50", "key": "elsewhere", "checkpoint": str(tmp_path / "none" / "model.pt")},
        {"name": "resnet50", "key": "imagenet"},
    ]}}
    captions = finetuned_captions(manifest)
    assert captions == {
        "chestxray-resnet50": "chestxray-resnet50: fine-tuned, test accuracy 81.4 % (paper: 82.0 %).",
        "kvasir-vgg16": "kvasir-vgg16: fine-tuned, test accuracy 90.0 % (paper: 89.5 %).",
        "t": "t: fine-tuned, test accuracy 50.0 %.", "t@layer3": "t: fine-tuned, test accuracy 50.0 %.",
    }


# --------------------------------------------------------------------------------------------
# The whole path on a local Ray (2 CPU workers)


@pytest.fixture(scope="module")
def local_ray(s3_server):  # the S3 fixture first: workers must inherit its environment
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


def _finetune(cfg: dict, tmp_path: Path, *args: str) -> int:
    from pipeline.cli import main

    path = tmp_path / f"{cfg['name']}-{len(list(tmp_path.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["finetune", str(path), *args])


@pytest.mark.slow
def test_chest_xray_fine_tunes_on_ray_train_and_evaluates(local_ray, tmp_path, capsys):
    src = make_chest_xray(tmp_path / "raw")
    bad = src / "train" / "NORMAL" / "IM-0000.jpeg"
    bad.write_bytes(bad.read_bytes()[:-200])  # truncated: passes ingest's header check, does not decode
    samples = str(tmp_path / "samples")
    report = ingest(IngestOptions("chestxray", str(src.parent), samples, check="header"), **QUIET)
    assert report["counts"]["written"] == 176
    out = tmp_path / "model"
    cfg = small_config(samples, out, workers=2) | {"name": "cxr"}
    assert _finetune(cfg, tmp_path) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9 and metrics["skipped"] == {"train": 1, "val": 0, "test": 0}
    assert np.array(metrics["confusion"]).sum() == 40 and metrics["dataset"] == "chestxray"
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4] and all(e["images_per_s"] > 0 for e in metrics["epochs"])
    assert metrics["epochs"][0]["images"] == 120  # 119 decodable images, padded to equal shares of 2 workers
    # the state dict loads with weights_only=True into the evaluation's model
    state = torch.load(out / "model.pt", weights_only=True)
    assert state["fc.weight"].shape == (2, state["fc.weight"].shape[1])
    assert "preprocess: {resize: 32}" in printed and f"checkpoint: {out / 'model.pt'}" in printed

    from pipeline.config import load_config as load_run_config
    from pipeline.job import run, run_uri

    run_cfg = load_run_config({
        "run_id": "eval", "output": str(tmp_path / "runs"),
        "datasets": [{"name": "chestxray-test", "uri": str(tmp_path / "test-samples"), "preprocess": {"resize": 32}}],
        "models": [{"name": "test_resnet", "key": "cxr", "checkpoint": str(out / "model.pt"), "num_classes": 2, "layer": "layer4"}],
        "methods": {"gradcam": {}, "opticam": {"iterations": 3}}, "metrics": ["classification"],
        "compute": {"batch_size": 8}, "save_maps": "none",
    })
    ingest(IngestOptions("chestxray", str(src.parent), run_cfg.datasets[0].uri, split="test"), **QUIET)
    summary = run(run_cfg, log=lambda *_: None)
    assert summary.computed == 80 and summary.failed == 0
    import pyarrow.dataset as pads

    rows = pads.dataset(run_uri(run_cfg.output, "eval"), format="parquet").to_table(
        columns=["method", "error", "label_name"]).to_pylist()
    assert Counter(r["method"] for r in rows) == {"gradcam": 40, "opticam": 40} and not any(r["error"] for r in rows)


@pytest.mark.slow
def test_kvasir_survives_a_lost_worker_and_a_killed_driver(local_ray, s3_prefix, tmp_path, monkeypatch):
    """Samples, checkpoints and the model on S3 (a real S3 endpoint on 127.0.0.1)."""
    from pipeline import storage
    from pipeline.finetune.cli import FAIL_ENV, STOP_ENV

    samples = f"{s3_prefix}samples/"
    ingest(IngestOptions("kvasir", str(make_kvasir(tmp_path / "raw", per_class=40)), samples), **QUIET)
    out = f"{s3_prefix}model"
    cfg = small_config(samples, out, classes=8, workers=2, epochs=(1, 4)) | {"name": "kv"}
    marker = tmp_path / "failed-once"
    # a worker raises after epoch 1 (Ray Train restarts the group from that checkpoint), then the
    # driver stops after epoch 2 as if killed: no model.pt yet
    monkeypatch.setenv(FAIL_ENV, f"1:{marker}")
    monkeypatch.setenv(STOP_ENV, "2")
    assert _finetune(cfg, tmp_path) == 3
    assert marker.exists() and not storage.exists(f"{out}/model.pt")
    monkeypatch.delenv(FAIL_ENV)
    monkeypatch.delenv(STOP_ENV)
    assert _finetune(cfg, tmp_path) == 2  # without --resume: refused, the run is kept
    assert _finetune(cfg, tmp_path, "--resume") == 0
    metrics = json.loads(storage.read_text(f"{out}/metrics.json"))
    assert metrics["resumed_at"] == [1, 2]  # the worker's restart, then the driver's
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5]
    assert metrics["test_accuracy"] >= 0.9 and np.array(metrics["confusion"]).sum() == 40
    assert metrics["samples"]["train"]["classes"] == [30] * 8  # 6:1:1 of 40 per class
    from opticam_core import load_model

    bundle = load_model("test_resnet", checkpoint=f"{out}/model.pt", num_classes=8, layer="layer4")
    assert bundle.model(torch.rand(1, 3, 32, 32)).shape == (1, 8)


def test_run_config_preprocess_is_in_the_fingerprint_and_the_evaluator():
    from pipeline.config import load_config as load_run_config
    from pipeline.evaluate import Evaluator
    from pipeline.fingerprint import changes, fingerprints

    def cfg(pre):
        ds = {"name": "cxr", "uri": "/s", **({"preprocess": pre} if pre is not None else {})}
        return load_run_config({"run_id": "r", "output": "/o", "datasets": [ds], "methods": ["gradcam"],
                                "models": [{"name": "resnet50", "num_classes": 2, "checkpoint": "/m.pt"}]})

    default, direct = fingerprints(cfg(None)), fingerprints(cfg({"resize": 224}))
    assert [(c.field, c.old, c.new) for c in changes(default, direct)] == [("preprocessing.resize", 256, [224, 224])]
    assert not changes(default, fingerprints(cfg({"resize": 256, "crop": 224})))  # the default, written out
    with pytest.raises(ConfigError, match=r"datasets\[0\].preprocess"):
        cfg({"resize": 224, "crop": 256})
    ev = Evaluator(run_id="r", dataset="cxr", model={"name": "test_resnet", "weights": None, "layer": "layer4"},
                   methods={"gradcam": {}}, metrics={}, device="cpu", preprocess={"resize": 40})
    prepared = ev.prepare([encoded(Image.new("RGB", (100, 30)))], [[]])
    assert tuple(prepared.images.shape) == (1, 3, 40, 40)  # the whole image squashed, no crop


def test_the_report_shows_the_test_accuracy_in_the_tables_captions(tmp_path):
    """build_report puts the caption line under every table of a fine-tuned model."""
    from pipeline.report.build import build_report
    from tests._runs import make_run

    spec = make_run(tmp_path / "out", models=("chestxray-resnet50",), methods=("fakecam", "gradcam"),
                    datasets={"chestxray": 6})
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metrics.json").write_text(json.dumps({"test_accuracy": 0.8137, "dataset": "chestxray"}))
    manifest = json.loads((spec.path / "_run.json").read_text())
    manifest["config"]["models"] = [{"name": "resnet50", "key": "chestxray-resnet50", "num_classes": 2,
                                     "checkpoint": str(tmp_path / "ckpt" / "model.pt")}]
    (spec.path / "_run.json").write_text(json.dumps(manifest))
    report = build_report(str(spec.path), tmp_path / "report", resamples=5, figures=False, log=lambda m: None)
    assert report.tables and all("test accuracy 81.4 % (paper: 82.0 %)" in t.caption for t in report.tables)
    assert "(paper: 82.0 %)" in (tmp_path / "report" / "tables.md").read_text()
