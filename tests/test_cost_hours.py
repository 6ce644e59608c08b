"""`opticam run --check`'s GPU-hours: forward-equivalents (opticam_core.cost) × images × the seconds
per forward-equivalent of a throughput table (`python -m benchmarks.gpu`), else a stated assumption."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from opticam_core.cost import model_info, per_image
from pipeline import throughput as tp
from pipeline.config import load_config
from pipeline.job import describe_cost
from tests._samples import toy_config

NIGHTLY = Path(__file__).parents[1] / "cluster/configs/imagenet-nightly.yaml"


def _toy(tmp_path, limit=7, targets=None):
    cfg = toy_config(str(tmp_path / "samples"), str(tmp_path / "out"), limit=limit)
    if targets:
        cfg["targets"] = targets
    return load_config(cfg, run_id="r")


def _equivalents(config, plan=0):
    dataset, model, methods = config.plans()[plan]
    info = model_info(model.name, model.layer, model.num_classes)
    return per_image({k: config.methods[k] for k in methods}, config.metrics, info).equivalents, info


def _hours(text: str) -> list[float]:
    return [float(h.replace(",", "")) for h in re.findall(r"GPU time: ([\d,.]+) GPU-hours", text)]


def test_hours_follow_from_the_table(tmp_path):
    config = _toy(tmp_path, limit=7, targets=["label", "top1"])
    eq, _ = _equivalents(config)
    table = tp.Throughput.from_dict({"device": "Fake GPU", "date": "2026-01-01",
                                     "seconds_per_equivalent": {"test_efficientnet": {"fp32": 25.0}}}, "fake.json")
    out = describe_cost(config, table)
    expected = eq * 2 * 7 * 25.0 / 3600  # × 2 targets × 7 images
    assert _hours(out) == [pytest.approx(expected, abs=0.005)]
    assert "measured on Fake GPU, 2026-01-01 (fake.json)" in out
    assert f"GPU time in total: {expected:,.2f} GPU-hours" in out
    assert "ASSUMED" not in out


def test_without_a_measurement_the_flop_assumption_is_said(tmp_path):
    config = _toy(tmp_path, limit=1000)
    eq, info = _equivalents(config)
    out = describe_cost(config, None)
    seconds = info.gflops * 1e9 / (67e12 * 0.4)  # fp32 at 40% of an H100's 67 TFLOP/s
    assert _hours(out) == [pytest.approx(eq * 1000 * seconds / 3600, abs=0.005)]
    assert "ASSUMED, not measured" in out and "40%" in out
    # a table that lacks the model: the assumption again, and why
    other = tp.Throughput.from_dict({"seconds_per_equivalent": {"resnet50": {"fp32": 1.0}}}, "t.json")
    assert "test_efficientnet at fp32 not in t.json; ASSUMED" in describe_cost(config, other)


def test_assumed_seconds_per_precision():
    assert tp.assumed_seconds(8.0, "bf16") == pytest.approx(8e9 / (989e12 * 0.4))
    assert tp.assumed_seconds(8.0, "tf32") == pytest.approx(8e9 / (494e12 * 0.4))
    assert tp.assumed_seconds(8.0, "fp32") == pytest.approx(8e9 / (67e12 * 0.4))


def test_no_fixed_number_of_images_gives_time_per_image(tmp_path):
    config = _toy(tmp_path, limit=None)
    eq, _ = _equivalents(config)
    table = tp.Throughput.from_dict({"seconds_per_equivalent": {"test_efficientnet": {"fp32": 0.002}}})
    out = describe_cost(config, table)
    assert f"GPU time: {eq * 0.002 * 1e3:,.1f} ms per image" in out
    assert "not fixed" in out and "GPU time in total" not in out


def test_goal_line():
    assert "met" in tp.goal_line(4.0) and "0.50 h on 8 GPUs" in tp.goal_line(4.0)
    assert "missed by ×3.0" in tp.goal_line(24.0) and "3.0 h on 8 GPUs" in tp.goal_line(24.0)


@pytest.mark.parametrize("bad", [{}, {"seconds_per_equivalent": {"m": 1}},
                                 {"seconds_per_equivalent": {"m": {"fp32": -1}}},
                                 {"seconds_per_equivalent": {"m": {"fp32": "fast"}}}])
def test_a_bad_table_is_refused(bad):
    with pytest.raises(tp.ThroughputError):
        tp.Throughput.from_dict(bad, "bad.json")


def test_cli_reads_the_table_named_and_refuses_a_bad_one(tmp_path, capsys, monkeypatch):
    from pipeline.cli import main as cli_main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(toy_config(str(tmp_path / "s"), str(tmp_path / "out"), limit=3)))
    table = tmp_path / "tp.json"
    table.write_text(json.dumps({"device": "Fake", "date": "d",
                                 "seconds_per_equivalent": {"test_efficientnet": {"fp32": 1.0}}}))
    monkeypatch.chdir(tmp_path)  # no benchmarks/throughput.json here
    assert cli_main(["run", str(path), "--check", "--throughput", str(table)]) == 0
    assert "measured on Fake, d" in capsys.readouterr().out
    assert cli_main(["run", str(path), "--check"]) == 0
    assert "ASSUMED" in capsys.readouterr().out
    # the default path, relative to the working directory
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "throughput.json").write_text(table.read_text().replace("Fake", "Default"))
    assert cli_main(["run", str(path), "--check"]) == 0
    assert "measured on Default" in capsys.readouterr().out
    (tmp_path / "broken.json").write_text("{not json")
    assert cli_main(["run", str(path), "--check", "--throughput", str(tmp_path / "broken.json")]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_nightly_total_and_goal_follow_from_the_table(tmp_path):
    config = load_config(str(NIGHTLY), output=str(tmp_path))
    per_plan = {model.name: _equivalents(config, i)[0] for i, (_, model, _) in enumerate(config.plans())}
    # a table that puts the nightly run at exactly twice the goal's 8 GPU-hours
    seconds = 16 * 3600 / (1000 * sum(per_plan.values()))
    table = tp.Throughput.from_dict({"seconds_per_equivalent": {m: {"fp32": seconds} for m in per_plan}})
    out = describe_cost(config, table)
    assert _hours(out) == [pytest.approx(per_plan[m] * 1000 * seconds / 3600, abs=0.005) for m in per_plan]
    gpus = config.compute.actors * config.compute.gpus_per_actor
    assert f"GPU time in total: 16.00 GPU-hours = {16 / gpus:,.2f} h on this config's {gpus:g} GPUs" in out
    assert "missed by ×2.0" in out


def test_the_runs_precision_picks_the_tables_column(tmp_path):
    cfg = toy_config(str(tmp_path / "samples"), str(tmp_path / "out"), limit=10)
    cfg["compute"]["precision"] = "bf16"
    config = load_config(cfg, run_id="r")
    eq, _ = _equivalents(config)
    table = tp.Throughput.from_dict({"seconds_per_equivalent": {"test_efficientnet": {"fp32": 30.0, "bf16": 10.0}}})
    out = describe_cost(config, table)
    assert _hours(out) == [pytest.approx(eq * 10 * 10.0 / 3600, abs=0.005)]
    assert "at bf16" in out
    # bf16 missing from the table: the bf16 assumption, not the fp32 measurement
    fp32_only = tp.Throughput.from_dict({"seconds_per_equivalent": {"test_efficientnet": {"fp32": 30.0}}}, "t.json")
    assert "test_efficientnet at bf16 not in t.json; ASSUMED" in describe_cost(config, fp32_only)
