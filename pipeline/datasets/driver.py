"""Raw dataset -> Parquet samples: list (adapter), cut into shards, write the shards in threads or
as Ray tasks, then write ``_ingest.json`` (counts, bad files, warnings) next to them.

Output layout: ``OUTPUT/part-00000.parquet ...`` (``SAMPLES`` schema, row groups of at most
``row_group`` rows, rows in sample_id order) and ``OUTPUT/_ingest.json``, whose presence marks a
finished ingest. Readers (``pyarrow.dataset``, ``ray.data.read_parquet``) skip the ``_`` file.

Re-ingesting into an existing output is refused unless ``overwrite``; then the earlier shards and
report are removed first. Anything else in the folder makes ``overwrite`` refuse too, so a wrong
``--output`` can never delete unrelated data.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from pipeline import storage
from pipeline.datasets.sources import IngestError, Listing, apply_limit
from pipeline.datasets.writer import (
    CHECKS,
    REPORT_NAME,
    SHARD_PATTERN,
    ShardResult,
    write_shard,
)
from pipeline.schema import SAMPLES_ROW_GROUP

KINDS = ("imagenet", "chestxray", "kvasir", "folder")
DEFAULT_SHARD_ROW_GROUPS = 4      # row groups per shard file
DEFAULT_RAY_THRESHOLD = 10_000    # files; below it threads on this machine are as fast as Ray
_LIST_CAP = 1000                  # ignored/skipped names kept in the report (bad files: all)


@dataclass
class IngestOptions:
    kind: str
    src: str
    output: str
    name: str | None = None            # the `dataset` column; default per kind (folder: SRC's name)
    split: str | None = None
    classes: str | None = None
    boxes: str | None = None
    limit: int | None = None
    workers: int | None = None         # threads, or CPUs of a local Ray started here
    row_group: int = SAMPLES_ROW_GROUP
    shard_size: int | None = None      # rows per file; default 4 row groups
    ray_threshold: int = DEFAULT_RAY_THRESHOLD
    overwrite: bool = False
    check: str = "decode"
    #: a seeded, class-stratified split {name: count or fraction} (kvasir: the paper's 6000/1000/1000
    #: unless --split names one split for every image; folder: only when given)
    split_sizes: dict[str, float] | None = None
    split_seed: int = 0


def default_name(kind: str, src: str) -> str:
    if kind != "folder":
        return kind
    return posixpath.basename(storage.split_uri(src)[1].rstrip("/")) or "folder"


def list_samples(opts: IngestOptions) -> Listing:
    from pipeline.datasets import chestxray, folder, imagenet

    if opts.kind == "imagenet":
        return imagenet.list_imagenet(opts.src, split=opts.split or "val", classes=opts.classes, boxes=opts.boxes)
    if opts.kind in ("chestxray", "kvasir") and opts.boxes:
        raise IngestError(f"{opts.kind} has no boxes; --boxes applies to imagenet and folder")
    if opts.kind == "chestxray":
        if opts.classes:
            raise IngestError("chestxray's classes are fixed (NORMAL=0, PNEUMONIA=1); drop --classes")
        return chestxray.list_chestxray(opts.src, split=opts.split)
    if opts.kind == "kvasir":
        return folder.list_kvasir(opts.src, split=opts.split or "all", classes_file=opts.classes)
    if opts.kind == "folder":
        return folder.list_folder(opts.src, split=opts.split or "all", classes_file=opts.classes, boxes_csv=opts.boxes)
    raise IngestError(f"unknown dataset kind {opts.kind!r}; choose from {list(KINDS)}")


def _split(listing: Listing, opts: IngestOptions) -> dict[str, int] | None:
    """Apply the seeded stratified split (in place); the counts per split, None without one."""
    from pipeline.datasets.folder import KVASIR_SPLIT, split_counts, stratified_split

    sizes = opts.split_sizes
    if opts.kind == "kvasir" and opts.split == "all":
        if sizes is not None:
            raise IngestError("--split all records every image under one split; drop --split-sizes")
        return None
    keep = opts.split
    if keep and (sizes is not None or opts.kind == "kvasir") and keep not in KVASIR_SPLIT:
        raise IngestError(f"--split {keep!r}: with a seeded split, --split keeps one of {list(KVASIR_SPLIT)}"
                          + (" (or `all`: no split, every image under `all`)" if opts.kind == "kvasir" else ""))
    if sizes is None and opts.kind == "kvasir":
        n = len(listing.candidates)
        sizes = dict(KVASIR_SPLIT)
        if n != sum(sizes.values()):  # not the full Kvasir v2 (a subset, --limit): the same proportions
            listing.warnings.append(f"{n} images, not Kvasir v2's {sum(sizes.values())}: split 6:1:1 "
                                    "(pass --split-sizes to choose)")
            total = sum(sizes.values())
            sizes = {k: v / total for k, v in sizes.items()}
    if sizes is None:
        return None
    counts = split_counts(sizes, len(listing.candidates))
    listing.candidates, left = stratified_split(listing.candidates, counts, opts.split_seed)
    if left:
        listing.warnings.append(f"{left} images are in none of the splits {counts} and were left out")
    if keep:  # one part only (e.g. the evaluation's test samples); the same seed gives the same part
        listing.candidates = [c for c in listing.candidates if c.split == keep]
    return counts


def prepare_output(output: str, overwrite: bool, delete: bool = True) -> None:
    """Refuse to mix with an earlier ingest unless ``overwrite``; then remove only its files
    (``delete=False``: only check, so a bad command fails before anything is listed)."""
    existing = storage.find(output) if storage.isdir(output) else ([output] if storage.exists(output) else [])
    if not existing:
        return
    if storage.exists(output) and not storage.isdir(output):
        raise IngestError(f"--output {storage.redact(output)} is a file, not a folder")
    if not overwrite:
        raise IngestError(f"--output {storage.redact(output)} already holds {len(existing)} files; "
                          "pass --overwrite to replace an earlier ingest, or choose another folder")
    base = storage.fsspec_filesystem(output)[1].rstrip("/")
    ours = re.compile(rf"^(?:{SHARD_PATTERN}|{re.escape(REPORT_NAME)})$")
    foreign = [u for u in existing if not ours.match(storage.split_uri(u)[1][len(base) + 1:].replace(os.sep, "/"))]
    if foreign:
        raise IngestError(f"--output {storage.redact(output)} holds files that ingest did not write "
                          f"(e.g. {storage.redact(foreign[0])}); refusing to delete them with --overwrite")
    if delete:
        for uri in existing:
            storage.rm(uri)


def _log(msg: str) -> None:
    print(storage.redact(msg), file=sys.stderr, flush=True)


class _Progress:
    """One line per finished shard, at most every ``every`` seconds (and always the last)."""

    def __init__(self, total_files: int, total_shards: int, log: Callable[[str], None], every: float = 2.0):
        self.total_files, self.total_shards, self.log, self.every = total_files, total_shards, log, every
        self.files = self.rows = self.bad = self.shards = 0
        self.start = self.last = time.monotonic()

    def update(self, r: ShardResult, files: int) -> None:
        self.files += files
        self.rows += r.rows
        self.bad += len(r.bad)
        self.shards += 1
        now = time.monotonic()
        if now - self.last >= self.every or self.shards == self.total_shards:
            self.last = now
            rate = self.files / max(now - self.start, 1e-9)
            self.log(f"ingest: {self.shards}/{self.total_shards} shards, {self.files}/{self.total_files} files "
                     f"({self.rows} rows, {self.bad} bad), {rate:.0f} files/s")


def _run_threads(jobs, write_args, workers, progress) -> tuple[list[ShardResult], list[str]]:
    results, failures = [], []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(write_shard, i, chunk, *write_args): (i, chunk) for i, chunk in jobs}
        for fut in as_completed(futures):
            i, chunk = futures[fut]
            try:
                r = fut.result()
            except Exception as e:
                failures.append(storage.redact(f"shard {i}: {type(e).__name__}: {e}"))
                continue
            results.append(r)
            progress.update(r, len(chunk))
    return results, failures


def _run_ray(jobs, write_args, workers, progress, pin_to_driver: bool, log) -> tuple[list[ShardResult], list[str]] | None:
    """Shards as Ray tasks; None when Ray cannot run them here (the caller falls back to threads)."""
    import ray

    started = False
    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, "log_to_driver": True}
        if not os.environ.get("RAY_ADDRESS"):
            kwargs["num_cpus"] = workers
        ray.init(**kwargs)
        started = True
    try:
        options: dict = {"num_cpus": 1, "max_retries": 3}
        if pin_to_driver:
            # local files exist on this node only: run every shard here
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node_id = ray.get_runtime_context().get_node_id()
            cpus = next((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("NodeID") == node_id), 0)
            if cpus < 1:
                log("ingest: this Ray node has no CPUs for tasks and the input or output is local; using threads")
                return None
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        task = ray.remote(write_shard).options(**options)
        pending = {task.remote(i, chunk, *write_args): (i, len(chunk)) for i, chunk in jobs}
        results, failures = [], []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i, n = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except Exception as e:
                    failures.append(storage.redact(f"shard {i}: {type(e).__name__}: {e}"))
                    continue
                results.append(r)
                progress.update(r, n)
        return results, failures
    finally:
        if started:
            ray.shutdown()


def ingest(opts: IngestOptions, log: Callable[[str], None] = _log) -> dict:
    """Run an ingest; returns the report (also written to ``OUTPUT/_ingest.json``). Raises
    IngestError before writing anything when the input or options are wrong."""
    if opts.kind not in KINDS:
        raise IngestError(f"unknown dataset kind {opts.kind!r}; choose from {list(KINDS)}")
    if opts.row_group < 1:
        raise IngestError("--row-group must be at least 1")
    if opts.check not in CHECKS:
        raise IngestError(f"--check must be one of {list(CHECKS)}")
    if opts.limit is not None and opts.limit < 0:
        raise IngestError("--limit must be >= 0")
    if opts.split_sizes is not None and opts.kind not in ("kvasir", "folder"):
        raise IngestError(f"--split-sizes applies to kvasir and folder; {opts.kind} has its own splits")
    shard_size = opts.shard_size or DEFAULT_SHARD_ROW_GROUPS * opts.row_group
    if shard_size < 1:
        raise IngestError("--shard-size must be at least 1")
    shard_size = math.ceil(shard_size / opts.row_group) * opts.row_group  # whole row groups per file
    workers = max(1, opts.workers or os.cpu_count() or 1)
    dataset = opts.name or default_name(opts.kind, opts.src)
    t0 = time.perf_counter()

    prepare_output(opts.output, opts.overwrite, delete=False)
    log(f"ingest: listing {opts.kind} in {opts.src}")
    listing = apply_limit(list_samples(opts), opts.limit)
    split_counts = _split(listing, opts)
    n = len(listing.candidates)
    log(f"ingest: {n} images to read ({len(listing.skipped)} skipped, {len(listing.ignored)} other files ignored), "
        f"{len(listing.classes)} classes")
    prepare_output(opts.output, opts.overwrite)

    jobs = [(i, listing.candidates[lo:lo + shard_size]) for i, lo in enumerate(range(0, n, shard_size))]
    write_args = (opts.output, dataset, opts.row_group, opts.check)
    progress = _Progress(n, len(jobs), log)
    engine = "threads"
    outcome = None
    if jobs and n >= opts.ray_threshold:
        engine = "ray"
        pin = not (storage.is_remote(opts.src) and storage.is_remote(opts.output))
        outcome = _run_ray(jobs, write_args, workers, progress, pin, log)
    if outcome is None:
        engine = "threads"
        outcome = _run_threads(jobs, write_args, workers, progress)
    results, failures = outcome
    results.sort(key=lambda r: r.index)

    bad = [b for r in results for b in r.bad]
    report = {
        "dataset": dataset,
        "kind": opts.kind,
        "source": storage.redact(opts.src),
        "output": storage.redact(opts.output),
        "split": opts.split,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "engine": engine,
        "check": opts.check,
        "row_group": opts.row_group,
        "shard_size": shard_size,
        "limit": opts.limit,
        "classes": listing.classes,
        "class_keys": listing.class_keys,
        "split_sizes": split_counts,
        "split_seed": opts.split_seed if split_counts else None,
        "counts": {"listed": n, "written": sum(r.rows for r in results), "bad": len(bad),
                   "skipped": len(listing.skipped), "ignored": len(listing.ignored),
                   "failed_shards": len(failures)},
        "shards": [{"name": r.name, "rows": r.rows} for r in results if r.name],
        "bad": bad,
        "skipped": listing.skipped[:_LIST_CAP],
        "ignored": [storage.redact(x) for x in listing.ignored[:_LIST_CAP]],
        "warnings": listing.warnings + [w for r in results for w in r.warnings][:_LIST_CAP],
        "failures": failures,
    }
    text = storage.redact(json.dumps(report, indent=1, ensure_ascii=False))
    if not failures:  # the report marks a complete ingest; a partial one has none
        storage.write_text(storage.join(opts.output, REPORT_NAME), text)
    return json.loads(text)


def summary(report: dict, shown: int = 20) -> str:
    """A few human lines: counts, the bad files (first ``shown``), warnings, failures."""
    c = report["counts"]
    lines = [f"ingest {report['dataset']}: {c['written']} samples written to {report['output']} "
             f"in {len(report['shards'])} shards ({report['engine']}, {report['seconds']:.1f} s)"]
    if c["bad"]:
        lines.append(f"{c['bad']} files are not decodable images and were skipped:")
        lines += [f"  {b['path']}: {b['reason']}" for b in report["bad"][:shown]]
        if c["bad"] > shown:
            lines.append(f"  ... and {c['bad'] - shown} more")
    if c["skipped"]:
        lines.append(f"{c['skipped']} images skipped by the adapter, e.g. "
                     + "; ".join(f"{s['path']} ({s['reason']})" for s in report["skipped"][:3]))
    for w in report["warnings"][:shown]:
        lines.append(f"warning: {w}")
    for f in report["failures"]:
        lines.append(f"FAILED {f}")
    if report["failures"]:
        lines.append("ingest incomplete: no _ingest.json written; rerun with --overwrite")
    else:
        lines.append(f"report: {storage.join(report['output'], REPORT_NAME)}")
    return storage.redact("\n".join(lines))
