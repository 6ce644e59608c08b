"""`opticam demo | ingest | run | report | finetune`: each command lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> int`; only the command asked for is imported (so
`opticam report` never imports Ray)."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": ("pipeline.demo", "run the embedded default evaluation on packaged photos (no network)"),
    "ingest": ("pipeline.datasets.cli", "turn a raw dataset into Parquet samples (local or s3://)"),
    "run": ("pipeline.job", "evaluate methods and metrics on samples with Ray, per a YAML config"),
    "report": ("pipeline.report.cli", "the paper's tables and figures from a run's results"),
    "finetune": ("pipeline.finetune.cli", "fine-tune a classifier on ingested samples with Ray Train (the medical models)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="opticam", description="Opti-CAM and the CAM baselines, evaluated at scale.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(cmd)
            cmd.set_defaults(handler=mod.main)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
