"""`opticam finetune CONFIG.yaml [--output URI] [--resume]`: the medical models (PAPER.md App. E)
on Ray Train; see `pipeline.finetune.driver` for what it writes."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline import storage

#: Test hooks (never needed in use): stop after epoch K as if the driver died, or make the last
#: worker raise once after epoch K ("K:MARKER_PATH", the marker keeps it to once).
STOP_ENV = "OPTICAM_FINETUNE_STOP_AFTER"
FAIL_ENV = "OPTICAM_FINETUNE_FAIL_ONCE"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="fine-tuning config (YAML); see cluster/configs/finetune-*.yaml")
    parser.add_argument("--output", help="the run's folder, local or s3:// (overrides the config's)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--check", action="store_true", help="validate the config and the samples, then exit")


def main(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.finetune.config import load_config
    from pipeline.finetune.data import DataError, check_splits
    from pipeline.finetune.driver import FinetuneError, finetune, run_config_entry

    try:
        config = load_config(args.config, output=args.output)
        if args.check:
            for name, info in check_splits(config).items():
                print(f"{name}: {info['rows']} samples, per class {info['classes']}")
            return 0
        hooks = {}
        if os.environ.get(STOP_ENV):
            hooks["stop_after"] = int(os.environ[STOP_ENV])
        if os.environ.get(FAIL_ENV):
            hooks["fail_once"] = os.environ[FAIL_ENV]
        metrics = finetune(config, resume=args.resume, address=args.address, hooks=hooks)
    except (ConfigError, DataError, FinetuneError) as err:
        print(f"opticam finetune: error: {storage.redact(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        from ray.train import TrainingFailedError

        if not isinstance(err, TrainingFailedError):
            raise
        print(f"opticam finetune: training failed: {storage.redact(err)}\n"
              "Continue from the last checkpoint with --resume.", file=sys.stderr)
        return 1
    if "stopped" in metrics:
        print(f"opticam finetune: stopped after epoch {metrics['stopped']} ({STOP_ENV}); continue with --resume",
              file=sys.stderr)
        return 3
    print(json.dumps({"test_accuracy": metrics["test_accuracy"], "confusion": metrics["confusion"],
                      "skipped": metrics["skipped"]}))
    print(f"wrote {storage.redact(storage.join(config.output, 'model.pt'))} and metrics.json. "
          "To evaluate it, paste into a run config:")
    print(run_config_entry(config))
    return 0
