"""The driver of `opticam finetune`: check the config and the samples, run the loop on Ray Train
(`TorchTrainer`, one worker per GPU, DDP), then write what the evaluation needs.

Output layout (local or s3://):
  OUT/config.yaml      the validated config (a --resume must match it, compute aside)
  OUT/train/           Ray Train's run: one checkpoint per epoch (the last two kept), its state
  OUT/model.pt         the network's plain state dict (`load_model(name, checkpoint=..., num_classes=...)`)
  OUT/metrics.json     per-epoch loss / accuracy / images/s, test accuracy and confusion matrix,
                       images skipped as undecodable per split

A driver that dies (or a run stopped after too many worker failures) is continued with `--resume`:
Ray Train finds its state under OUT/train (same run name and storage) and the workers start from
the last checkpoint; the driver also passes the newest `state.pt` it sees, for a run directory
whose Ray state is gone.
"""

from __future__ import annotations

import io
import json
import sys
import time
from datetime import datetime, timezone
from typing import Callable

import torch
import yaml

from pipeline import storage
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.data import check_splits
from pipeline.job import ensure_ray

RAY_DIR = "train"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


class FinetuneError(RuntimeError):
    """A fine-tuning run that cannot start or finish; the message says why and what to do."""


def _log(msg: str) -> None:
    print(storage.redact(msg), file=sys.stderr, flush=True)


def _flat(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def _config_changes(old: dict, new: dict) -> list[str]:
    """Fields a resumed run may not change (compute and output may: they do not change the model)."""
    a, b = _flat(old), _flat(new)
    skip = ("compute.", "output")
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if not k.startswith(skip) and a.get(k) != b.get(k)]


def last_checkpoint(out: str) -> str | None:
    """The newest checkpoint folder under OUT/train holding a state (Ray names them by time)."""
    run = storage.join(out, RAY_DIR)
    if not storage.isdir(run):
        return None
    names = sorted(u for u in storage.listdir(run) if u.rstrip("/").rsplit("/", 1)[-1].startswith("checkpoint_"))
    for uri in reversed(names):
        if storage.exists(storage.join(uri, "state.pt")):
            return uri
    return None


def prepare_output(config: FinetuneConfig, resume: bool) -> str | None:
    """Refuse to mix runs; returns the newest checkpoint when resuming."""
    out = config.output
    cfg_uri = storage.join(out, CONFIG_FILE)
    held = [u for u in (storage.join(out, RAY_DIR), storage.join(out, MODEL_FILE), cfg_uri) if storage.exists(u)]
    if held and not resume:
        raise FinetuneError(f"--output {storage.redact(out)} already holds a fine-tuning run; pass --resume to "
                            "continue it, or choose another --output")
    if resume and not held:  # a retried cluster job passes --resume from its first attempt on
        _log(f"finetune: --resume: no run in {storage.redact(out)} yet; starting one")
        return None
    if resume and storage.exists(cfg_uri):
        changed = _config_changes(yaml.safe_load(storage.read_text(cfg_uri)), config.to_dict())
        if changed:
            raise FinetuneError("--resume with another configuration than the run's; nothing was changed:\n  "
                                + "\n  ".join(changed) + "\nStart a new run in another --output instead.")
    return last_checkpoint(out) if resume else None


def finetune(config: FinetuneConfig, *, resume: bool = False, address: str | None = None,
             hooks: dict | None = None, log: Callable[[str], None] = _log) -> dict:
    """Run (or continue) a fine-tuning; returns the metrics written to OUT/metrics.json, or
    {"stopped": epoch} when a test hook stopped the run early."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from pipeline.finetune.train import read_state, worker_loop

    fallback = prepare_output(config, resume)
    splits = check_splits(config)
    log("finetune: samples " + ", ".join(f"{k} {v['rows']} (per class {v['classes']})" for k, v in splits.items()))
    out = config.output
    storage.makedirs(out)
    if not storage.exists(storage.join(out, CONFIG_FILE)):
        storage.write_text(storage.join(out, CONFIG_FILE), yaml.safe_dump(config.to_dict(), sort_keys=False))
    t0 = time.perf_counter()
    ensure_ray(address, min_cpus=config.compute.workers * config.compute.cpus_per_worker)
    log(f"finetune: Ray ready in {time.perf_counter() - t0:.1f} s")

    c = config.compute
    resources = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.gpus else {})}
    fs, path = storage.filesystem(out)
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": config.to_dict(), "hooks": hooks or {}, "fallback_checkpoint": fallback},
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=c.gpus, resources_per_worker=resources),
        run_config=RunConfig(
            name=RAY_DIR, storage_path=path, storage_filesystem=fs if storage.is_remote(out) else None,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),  # our epoch lines, not one per report
        ),
    )
    t0 = time.perf_counter()
    log(f"finetune: Ray Train starts {c.workers} worker(s) ({'1 GPU' if c.gpus else 'CPU'} each)")
    result = trainer.fit()
    log(f"finetune: Ray Train finished in {time.perf_counter() - t0:.1f} s")
    if result.checkpoint is None:
        raise FinetuneError("the run ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = read_state(d)
    if "test" not in state:
        return {"stopped": int(state["epoch"])}

    buf = io.BytesIO()
    torch.save(dict(state["model"]), buf)  # the network's own keys: what load_model's checkpoint= takes
    storage.write_bytes(storage.join(out, MODEL_FILE), buf.getvalue())
    metrics = {
        "name": config.name,
        "dataset": splits["train"]["dataset"],   # the samples' dataset name (the report's paper anchor)
        "model": config.model.model_dump(mode="json"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 1),
        "workers": c.workers, "gpus": c.gpus,
        "preprocess": config.preprocess.model_dump(mode="json", exclude_none=True),
        "samples": splits,
        "skipped": state["skipped"],
        "epochs": state["history"],
        "resumed_at": state.get("resumed", []),
        "test_accuracy": state["test"]["accuracy"],
        "confusion": state["test"]["confusion"].tolist(),
        "checkpoint": storage.redact(storage.join(out, MODEL_FILE)),
    }
    storage.write_text(storage.join(out, METRICS_FILE), json.dumps(metrics, indent=1))
    return metrics


def run_config_entry(config: FinetuneConfig) -> str:
    """The lines to paste into a run config to evaluate the fine-tuned model."""
    m = config.model
    entry = {"name": m.name, "key": m.key or config.name, "checkpoint": storage.redact(storage.join(config.output, MODEL_FILE)),
             "num_classes": m.num_classes}
    if m.layer:
        entry["layer"] = m.layer
    pre = config.preprocess.model_dump(mode="json", exclude_none=True)
    flow = lambda d: yaml.safe_dump(d, default_flow_style=True, sort_keys=False, width=10_000).strip()  # noqa: E731
    return (f"models:\n  - {flow(entry)}\n"
            f"datasets:  # the preprocessing the model was trained with\n  - {{name: ..., uri: ..., preprocess: {flow(pre)}}}")
