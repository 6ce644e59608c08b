"""`python -m benchmarks.gpu --tiny` on the CPU: every method measured, floors from the declared
costs, and a throughput table that `opticam run --check` reads."""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu
from opticam_core.methods import REGISTRY
from opticam_core.methods.registry import method_spec
from pipeline import throughput as tp


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "throughput.json"
    table = gpu.main(["--tiny", "--no-job", "--repeat", "1", "--out", str(out)])
    return table, out


def test_tiny_run_measures_every_method_at_each_precision(tiny):
    table, out = tiny
    assert json.loads(out.read_text())["seconds_per_equivalent"] == table["seconds_per_equivalent"]
    assert set(table["methods"]) == set(gpu.TINY_MODELS)
    cnn_methods = {k for k, s in REGISTRY.items() if s.family != "attention"}
    for model, per in table["methods"].items():
        assert set(per) == {"fp32", "bf16"}
        for prec, modes in per.items():
            assert set(modes) == {"eager"}
            measured = modes["eager"]
            if model == "test_vit":
                assert {"rawatt", "rollout", "tibav"} <= set(measured)
            assert cnn_methods <= set(measured)
            for key, row in measured.items():
                if prec == "fp32":  # fp32 is today's path: every method must run
                    assert "error" not in row, (model, key, row)
                if "error" in row:
                    continue
                assert row["img_per_s"] == pytest.approx(row["images"] / row["seconds"])
                if row["floor_seconds"]:
                    assert row["ratio"] == pytest.approx(row["seconds"] / row["floor_seconds"])
    assert not table["skipped"]


def test_floor_is_the_declared_cost_in_the_measured_pass_times(tiny):
    table, _ = tiny
    passes = table["passes"]["test_efficientnet"]["fp32"]
    p = gpu.Passes(**passes)
    row = table["methods"]["test_efficientnet"]["fp32"]["eager"]["opticam"]
    # Opti-CAM, 3 iterations, alone: the shared clean forward, 3 forward+backward steps, a last
    # forward (5 forwards, 3 backwards: test_cost counts them); the floor is that in the measured times.
    cost = method_spec("opticam").cost_of({"iterations": 3}).standalone()
    assert (cost.forwards, cost.backwards) == (5, 3)
    assert row["floor_seconds"] == pytest.approx(row["images"] * (cost.forwards * p.forward
                                                                  + cost.backwards * p.backward))
    assert table["seconds_per_equivalent"]["test_efficientnet"]["fp32"] == pytest.approx(
        max(p.forward, p.forward_backward / 3))


def test_the_table_is_what_check_reads(tiny):
    table, out = tiny
    t = tp.load(str(out))
    assert t.device.startswith("CPU") and t.date == table["date"]
    assert t.seconds["test_vit"]["bf16"] == table["seconds_per_equivalent"]["test_vit"]["bf16"]
    seconds, source = tp.seconds_per_equivalent(t, "test_efficientnet", "fp32", gflops=1.0)
    assert seconds == table["seconds_per_equivalent"]["test_efficientnet"]["fp32"]
    assert source.startswith("measured on CPU")


def test_without_the_precision_keyword_it_says_so_and_measures_fp32(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "explain_keywords", lambda: {"unbounded"})
    table = gpu.main(["--tiny", "--no-job", "--repeat", "1", "--models", "test_efficientnet", "--layers", "bn2",
                      "--compile", "on", "--out", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert "no `precision` keyword: fp32 only" in out and "no `compile` keyword: eager only" in out
    assert set(table["seconds_per_equivalent"]["test_efficientnet"]) == {"fp32"}
    assert set(table["methods"]["test_efficientnet"]["fp32"]) == {"eager"}


def test_a_tight_budget_skips_and_says_so(tmp_path, capsys):
    table = gpu.main(["--tiny", "--no-job", "--repeat", "1", "--models", "test_efficientnet", "--layers", "bn2",
                      "--precisions", "fp32", "--budget", "0", "--out", str(tmp_path / "t.json")])
    assert table["skipped"] and not table["methods"]["test_efficientnet"]
    assert "skipped for the time budget" in capsys.readouterr().out
    assert table["seconds_per_equivalent"]["test_efficientnet"]["fp32"] > 0  # the passes are always measured


@pytest.mark.slow
def test_tiny_run_with_the_ray_job(tmp_path):
    pytest.importorskip("ray")
    table = gpu.main(["--tiny", "--repeat", "1", "--models", "test_efficientnet", "--layers", "bn2",
                      "--precisions", "fp32", "--out", str(tmp_path / "t.json")])
    job = table["job"]
    assert "error" not in job, job
    assert job["images"] == 4 and job["job_img_per_s"] > 0 and job["in_process_img_per_s"] > 0
