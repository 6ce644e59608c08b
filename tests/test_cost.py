"""The declared costs (`opticam_core.cost`) against a count of the model's actual passes.

A counter on the bundle's model counts the images each forward takes and each backward returns
through the logits; the declaration of every registered method and metric group must equal that
count per image, up to the documented exceptions (passes per batch, TIBAV's LRP pass, which runs
no forward). `opticam run --check` prints the table, without loading weights.
"""

from __future__ import annotations

import math
import sys
import time

import pytest
import torch

from opticam_core.cost import Cost, ModelInfo, model_info, per_image
from opticam_core.methods import REGISTRY, explain
from opticam_core.metrics import GROUPS, compute
from tests import _toys

B = 2  # images per batch: per-batch passes show up as 1/B


class Counter:
    """Images through the forwards of `bundle.model` and of any model of its kind (the sanity
    check's randomised copies), and through backwards reaching their output."""

    def __init__(self, bundle):
        self.forwards = self.backwards = 0
        self._kind = type(bundle.model)
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, inputs, out):
        if type(module) is not self._kind:
            return
        self.forwards += inputs[0].shape[0]
        if out.requires_grad:
            out.register_hook(self._backward)

    def _backward(self, grad):
        self.backwards += grad.shape[0]

    def per_image(self, n: int = B) -> tuple[float, float]:
        return self.forwards / n, self.backwards / n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def _ours(registry) -> list[str]:
    """Registrations of the package (tests register throwaway ones of their own)."""
    return sorted(k for k, s in registry.items() if s.fn.__module__.startswith("opticam_core."))


@pytest.fixture(scope="module")
def cnn():
    return _toys.cnn_bundle(dtype=torch.float32, with_tail=False)


@pytest.fixture(scope="module")
def vit():
    return _toys.vit_bundle(dtype=torch.float32)


def _info(bundle) -> ModelInfo:
    with torch.no_grad():
        feats = bundle.features(_capture(bundle))
    return ModelInfo(name=bundle.name, channels=feats.shape[1], input_size=bundle.input_size)


def _capture(bundle):
    from opticam_core.hooks import capture

    with capture(bundle.target) as cap:
        bundle.model(_toys.images(1, dtype=torch.float32))
    return cap.output


#: Small options per method, and (forwards, backwards) per image that the count differs from the
#: declaration by, where the code documents why.
METHOD_CASES = {
    "fakecam": ("cnn", {}, (0, 0)),
    "gradcam": ("cnn", {}, (0, 0)),
    "gradcampp": ("cnn", {}, (0, 0)),
    "xgradcam": ("cnn", {}, (0, 0)),
    "layercam": ("cnn", {}, (0, 0)),
    "hirescam": ("cnn", {}, (0, 0)),
    "scorecam": ("cnn", {"batch_size": 3}, (0, 0)),  # and constant channels: see the test
    "ablationcam": ("cnn", {"batch_size": 3}, (0, 0)),
    "opticam": ("cnn", {"iterations": 3}, (0, 0)),
    "opticam:io": ("cnn", {"iterations": 2, "objective": "iomask", "select": "last"}, (0, 0)),
    "extremal": ("cnn", {"areas": [0.1, 0.3], "iterations": 2, "variant": "dual"}, (0, 0)),
    "lime": ("cnn", {"num_samples": 12, "quickshift_kernel_size": 2.0}, (0, 0)),
    "gradshap": ("cnn", {"n_samples": 3}, (0, 0)),
    "rawatt": ("vit", {}, (0, 0)),
    "rollout": ("vit", {}, (0, 0)),
    "tibav": ("vit", {}, (-3, 0)),  # the LRP pass: 3 forwards' worth of products, no forward
}


def test_every_method_declares_a_cost_and_is_counted_here():
    assert {k.split(":")[0] for k in METHOD_CASES} == set(_ours(REGISTRY))
    for key in _ours(REGISTRY):
        assert REGISTRY[key].cost is not None, key


@pytest.mark.parametrize("case", sorted(METHOD_CASES))
def test_method_cost_equals_the_counted_passes(case, cnn, vit):
    which, options, (df, db) = METHOD_CASES[case]
    bundle = cnn if which == "cnn" else vit
    key = case.split(":")[0]
    x, t = _toys.images(B, dtype=torch.float32), _toys.targets(B)
    declared = REGISTRY[key].cost_of(options, _info(bundle)).standalone()  # explain alone pays its shared pass
    with Counter(bundle) as n:
        explain(bundle, x, t, key, **options)
    f, b = n.per_image()
    if key == "scorecam":
        from opticam_core.maps import constant_maps

        flat = constant_maps(bundle.features(_capture_batch(bundle, x))).sum().item()
        df = -flat / B + (1 / B if flat else 0)  # skipped constant channels; one black forward per batch
    assert (f, b) == pytest.approx((declared.forwards + df, declared.backwards + db)), case


def _capture_batch(bundle, x):
    from opticam_core.hooks import capture

    with torch.no_grad(), capture(bundle.target) as cap:
        bundle.model(x)
    return cap.output


def test_methods_asked_together_share_one_pass(cnn):
    """explain(..., [gradcam, layercam, opticam]): one forward+backward for all, as per_image says."""
    x, t = _toys.images(B, dtype=torch.float32), _toys.targets(B)
    asked = {"gradcam": {}, "layercam": {}, "opticam": {"iterations": 2}}
    table = per_image(asked, {}, _info(cnn))
    with Counter(cnn) as n:
        explain(cnn, x, t, list(asked), **asked)
    assert n.per_image() == pytest.approx((table.forwards, table.backwards))
    assert table.equivalents == table.forwards + 2 * table.backwards


def test_ablationcam_with_a_tail_counts_its_fraction():
    bundle = _toys.cnn_bundle(dtype=torch.float32, with_tail=True)
    assert bundle.tail is not None
    cost = REGISTRY["ablationcam"].cost_of({}, ModelInfo(channels=8, tail=0.01))
    assert cost.forwards == pytest.approx(0.08) and "tail" in cost.note
    assert REGISTRY["ablationcam"].cost_of({"use_tail": False}, ModelInfo(channels=8, tail=0.01)).forwards == 8
    x, t = _toys.images(B, dtype=torch.float32), _toys.targets(B)
    with Counter(bundle) as n:
        explain(bundle, x, t, "ablationcam")
    assert n.per_image() == (1, 0)  # the shared clean forward only: the ablations run the tail


#: Small options per group; extra forwards per image the count shows (per-batch passes).
GROUP_CASES = {
    "classification": ({}, 0),
    "insertion_deletion": ({"steps": 5}, 1 / B),  # the black image, once per batch
    "localization": ({}, 0),
    "box_study": ({}, 0),
    "aopc": ({"patch_size": 8, "regions": 3}, 0),
    "selectivity": ({"alphas": [0.5, 1.0, 2.0]}, 0),
    # the groups that run the method again (here Grad-CAM: 1 forward + 1 backward per run)
    "sensitivity": ({"samples": 3}, 0),
    "adcc": ({"target": "label"}, 0),  # "pred" re-makes S(x) only where pred ≠ label: at most
    "sanity": ({"blocks": 2, "target": "predicted"}, 0),  # on the toy ViT: randomisation knows its blocks
}


def test_every_group_declares_a_cost_and_is_counted_here():
    assert set(GROUP_CASES) == set(_ours(GROUPS))
    for key in _ours(GROUPS):
        assert GROUPS[key].cost is not None, key


@pytest.mark.parametrize("group", sorted(GROUP_CASES))
def test_group_cost_equals_the_counted_passes(group, cnn, vit):
    options, extra = GROUP_CASES[group]
    cnn = vit if group == "sanity" else cnn
    x, t = _toys.images(B, dtype=torch.float32), _toys.targets(B)
    maps = explain(cnn, x, t, "gradcam").maps
    boxes = torch.tensor([[[4.0, 4.0, 20.0, 24.0]]] * B)
    with torch.no_grad():
        clean = cnn.model(x)
    info = _info(cnn)
    declared = GROUPS[group].cost_of(options, info)
    with Counter(cnn) as n:  # the sanity check's randomised copies of the model carry the counter
        compute(cnn, x, t, maps, boxes, which={group: options}, clean_logits=clean, method="gradcam",
                method_options={})
    method = REGISTRY["gradcam"].cost_of({}, info).standalone() * declared.reruns
    assert GROUPS[group].calls_method == bool(declared.reruns)
    assert n.per_image() == pytest.approx((declared.forwards + declared.once + method.forwards + extra,
                                           declared.backwards + method.backwards))


def test_cost_arithmetic_and_convention():
    c = Cost(forwards=3, backwards=2, shared={"forward"})
    assert c.equivalents == 7
    assert (c + Cost(1, 1)).equivalents == 10 and (c * 2).forwards == 6 and (2 * c).backwards == 4
    assert c.standalone() == Cost(4, 2)
    assert Cost(shared={"gradients"}).standalone() == Cost(1, 1)
    with pytest.raises(ValueError, match="unknown shared passes"):
        Cost(shared={"backward"})


def test_a_rerunning_group_multiplies_the_method_standalone():
    from opticam_core.metrics.registry import _no_options, register_group

    @register_group("_rerun3", fields=(), metrics=(), calls_method=True, cost=Cost(forwards=1, reruns=3))
    def _group(batch):
        return {}

    try:
        table = per_image({"gradcam": {}, "opticam": {"iterations": 10}}, {"_rerun3": {}}, ModelInfo(channels=8))
    finally:
        GROUPS.pop("_rerun3")
    rows = {(line.method, line.group): line for line in table}
    assert (rows["gradcam", "_rerun3"].forwards, rows["gradcam", "_rerun3"].backwards) == (1 + 3, 3)
    assert (rows["opticam", "_rerun3"].forwards, rows["opticam", "_rerun3"].backwards) == (1 + 3 * 12, 3 * 10)
    assert _no_options  # the registry's helper is importable (used by groups without options)


def test_a_registration_without_a_cost_shows_as_unknown():
    from opticam_core.methods.registry import register

    @register("_nocost", name="No cost", family="reference", rank=999)
    def _m(ctx):
        raise AssertionError("never run")

    try:
        table = per_image({"_nocost": {}, "gradcam": {}}, {"classification": {}})
        assert math.isnan(table.equivalents)
        assert "?" in table.format() and "declares no cost" in table.format()
    finally:
        REGISTRY.pop("_nocost")


def test_model_info_reads_the_architecture_on_meta():
    t0 = time.perf_counter()
    r50 = model_info("resnet50")
    vit = model_info("vit_b")  # an alias
    assert (r50.channels, r50.blocks, r50.input_size) == (2048, None, (224, 224))
    assert 7.5 < r50.gflops < 8.5 and 0 < r50.tail < 0.01  # 4.1 GMAC; the tail is avgpool + fc
    assert (vit.channels, vit.blocks, vit.tail) == (768, 12, None)
    assert 33 < vit.gflops < 37
    assert time.perf_counter() - t0 < 20
    assert model_info("no_such_net_xyz", "a").notes


def test_insertion_deletion_steps_follow_the_input_size():
    cost = GROUPS["insertion_deletion"].cost_of({}, ModelInfo(input_size=(224, 224)))
    assert cost.forwards == 2 * 224 - 1
    assert GROUPS["insertion_deletion"].cost_of({"steps": 10}, ModelInfo(input_size=(32, 32))).forwards == 19


def test_check_prints_the_table_for_a_toy_config(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main as cli_main
    from tests._samples import photo_rows, toy_config, write_samples

    _no_weights(monkeypatch)
    samples = write_samples(tmp_path / "s", photo_rows(2))
    cfg = toy_config(str(samples), str(tmp_path / "out"), limit=7)
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["run", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "[toy × test_efficientnet] model evaluations per image" in out
    for word in ("fakecam", "gradcam", "opticam", "insertion_deletion", "× 7 images"):
        assert word in out
    # opticam with 3 iterations: 4 forwards + 3 backwards = 10 forward-equivalents
    assert any(line.split()[:2] == ["opticam", "10"] for line in out.splitlines())


def test_check_prints_the_nightly_config_without_weights(capsys, monkeypatch, tmp_path):
    from pathlib import Path

    from pipeline.cli import main as cli_main

    _no_weights(monkeypatch)
    nightly = Path(__file__).parents[1] / "cluster/configs/imagenet-nightly.yaml"
    t0 = time.perf_counter()
    assert cli_main(["run", str(nightly), "--output", str(tmp_path), "--check"]) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    print(out, file=sys.stderr)
    for plan in ("resnet50", "vgg16_bn", "vit_base_patch16_224", "deit_base_patch16_224"):
        assert f"[imagenet-val × {plan}] model evaluations per image" in out
    assert out.count("× 1,000 images") == 4
    assert "2,048" in out  # Score-CAM on ResNet-50's layer4: K = 2048 forwards
    assert seconds < 30  # < 10 s on a free core; the CI machines are shared


def _no_weights(monkeypatch):
    """Any attempt to build a model with weights fails the test."""
    import opticam_core.models.networks as networks

    def refuse(*args, **kwargs):
        raise AssertionError("--check must not load weights")

    real_tv, real_timm = networks.torchvision_net, networks.timm_net
    monkeypatch.setattr(networks, "torchvision_net", lambda arch, weights: real_tv(arch, weights) if not weights
                        else refuse())
    monkeypatch.setattr(networks, "timm_net", lambda arch, weights: real_timm(arch, weights) if not weights
                        else refuse())
    monkeypatch.setattr(networks, "lite0_net", refuse)
