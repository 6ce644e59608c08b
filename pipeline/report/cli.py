"""`opticam report RUN_URI [--against PREV_RUN_URI|previous] [--out DIR] [--fail-on ...] [--bootstrap N]`."""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_ALERT, EXIT_ERROR = 0, 1, 2

EPILOG = """\
RUN_URI is a run folder (OUTPUT/run=RUN_ID, local or s3://) or an output root (its latest run).
Rows are read with pyarrow only; no Ray is needed.

comparison (--against):
  The two runs are joined on (dataset, sample_id, model, method); only rows successful in both
  are compared. Every aggregate's change (this run minus the other) gets a paired bootstrap 95%
  interval; a change is flagged when the interval excludes zero. Flags alone never change the
  exit code: a flagged change fails the check only when it exceeds a threshold:
    --fail-on 'AD=2,AG=2'   per metric, in the metric's units (percentage points; SM: its own)
    --fail-on 'AD*=2'       shell patterns match several keys (AD, AD@box_and_map, ...)
    --fail-on 'failed=0'    more than 0 rows that succeeded before and fail now
    --threshold 2           the same threshold for every metric not named in --fail-on
  --fail-direction worse counts only changes in a metric's bad direction (up for AD, D, OM, LE,
  SM; down for the others).

exit status:
  0  report written (and no threshold exceeded)
  1  a flagged change exceeded its threshold (the report is still written)
  2  usage error, run not found, or nothing to compare
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("run", metavar="RUN_URI", help="run folder (…/run=ID) or output root, local or s3://")
    parser.add_argument("--against", metavar="PREV_RUN_URI|previous",
                        help="compare with another run; 'previous' = the latest earlier run (manifest's "
                             "started time) under the same output root")
    parser.add_argument("--out", metavar="DIR", help="local folder for the report (default: OUTPUT/report=RUN_ID "
                        "beside a local run, ./reports/RUN_ID for a remote one)")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="N",
                        help="bootstrap resamples for the 95%% intervals (0: none; default 200)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--om-rule", default="ilsvrc", choices=("ilsvrc", "iou"),
                        help="OM/LE reading (opticam_core.metrics.aggregate): ilsvrc = a box counts at IoU ≥ 0.5 "
                             "(default); iou = the paper's literal 1 − IoU")
    parser.add_argument("--fail-on", action="append", default=[], metavar="METRIC=THRESHOLD[,...]",
                        help="exit 1 when a flagged change of METRIC exceeds THRESHOLD (repeatable; see below)")
    parser.add_argument("--threshold", type=float, metavar="X", help="threshold for every metric (see below)")
    parser.add_argument("--fail-direction", choices=("any", "worse"), default="any",
                        help="which flagged changes count against the thresholds (default any)")
    parser.add_argument("--top", type=int, default=20, help="samples listed as moved most (default 20)")
    parser.add_argument("--grid-images", type=int, default=6, help="images in the maps grid (default 6)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--no-paper", action="store_true", help="leave out the paper's values")
    parser.add_argument("--paper-dataset", action="append", default=[], metavar="NAME",
                        help="treat dataset NAME as ImageNet val for the paper's values (default: by name)")


def main(args: argparse.Namespace) -> int:
    from .compare import parse_thresholds
    from .runs import RunNotFound

    try:
        thresholds = parse_thresholds(args.fail_on, args.threshold)
    except ValueError as err:
        print(f"opticam report: {err}", file=sys.stderr)
        return EXIT_ERROR
    if args.bootstrap < 0:
        print("opticam report: --bootstrap must be ≥ 0", file=sys.stderr)
        return EXIT_ERROR
    if thresholds and not args.against:
        print("opticam report: --fail-on/--threshold need --against", file=sys.stderr)
        return EXIT_ERROR

    from .build import build_report

    try:
        report = build_report(
            args.run, args.out, against=args.against, resamples=args.bootstrap, seed=args.seed, om_rule=args.om_rule,
            grid_images=args.grid_images, figures=not args.no_figures, paper=not args.no_paper,
            paper_datasets=tuple(args.paper_dataset), top=args.top, thresholds=thresholds or None,
            direction=args.fail_direction)
    except RunNotFound as err:
        print(f"opticam report: {err}", file=sys.stderr)
        return EXIT_ERROR
    comp = report.comparison
    if comp is not None:
        k = comp.counts
        print(f"compared with {comp.old_run}: {k['shared']} shared rows, {len(comp.flagged)} of {len(comp.changes)} "
              f"aggregates changed beyond noise, {k['newly_failed']} newly failed rows")
        if k["shared"] == 0:
            print("opticam report: the runs share no successful row; nothing to compare", file=sys.stderr)
            return EXIT_ERROR
        if report.violations is not None and len(report.violations):
            for r in report.violations.itertuples():
                print(f"THRESHOLD EXCEEDED: {r.dataset}/{r.model}/{r.method} {r.metric}: {r.old:.3g} → {r.new:.3g} "
                      f"(Δ {r.delta:+.3g}, threshold {r.threshold:g})")
            return EXIT_ALERT
    print(f"report: {report.out / 'index.html'}")
    return EXIT_OK
