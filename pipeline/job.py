"""`opticam run CONFIG.yaml`: the evaluation as a Ray Data plan, resumable, streamed to Parquet.

Per (dataset, model): read the samples (local or s3://) → keep the samples that still miss rows
→ decode and preprocess them in CPU tasks (`pipeline.decode`) → `map_batches(Evaluator)` on a
pool of actors that each hold the frozen model (GPUs when the cluster has them) →
`write_parquet` to OUT/run=ID/dataset=D/model=M/, streamed.

Resume: every row carries (dataset, sample_id, model, method, target). Before a plan runs, the
rows already written under its directory are read (only those columns), and only the missing
(sample, method, target) triples are computed. A file a killed driver left half-written cannot be read:
it is deleted and its rows are computed again. So a rerun with the same run id, after a crash
or with methods added to the config, completes the run and holds each row exactly once.

One run id is one configuration (`fingerprint.py`): a rerun that would change how existing rows
were made is refused before any work, unless `--replace METHOD` names the methods to recompute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import posixpath
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from . import storage
from .config import (
    DEMO_URI,
    ConfigError,
    DatasetSpec,
    ModelSpec,
    RunConfig,
    load_config,
)
from .fingerprint import RunConflict, changes, conflict_message, fingerprints
from .schema import DEFAULTS, RESULTS, todo_entry

MANIFEST = "_run.json"


def run_uri(output: str, run_id: str) -> str:
    return storage.join(output, f"run={run_id}")


def plan_uri(output: str, run_id: str, dataset: str, model: str) -> str:
    return storage.join(run_uri(output, run_id), f"dataset={dataset}", f"model={model}")


# ------------------------------------------------------------------------------------------
# What is done already


def _rewrite_without(file: str, drop) -> int:
    """Rewrite one result file without the rows `drop(table)` marks (a boolean array); remove it
    when nothing is left. A reader sees the old file or the new one, never half of one.
    Returns the number of rows dropped."""
    fs, path = storage.filesystem(file)
    whole = pq.read_table(path, filesystem=fs)
    gone = drop(whole)
    dropped = int(pc.sum(gone).as_py() or 0)
    if not dropped:
        return 0
    kept = whole.filter(pc.invert(gone))
    if kept.num_rows == 0:
        storage.rm(file)
        return dropped
    # A dot name: dataset discovery skips it, should a crash leave it behind.
    tmp = posixpath.join(posixpath.dirname(path), "." + posixpath.basename(path) + ".tmp")
    pq.write_table(kept, tmp, filesystem=fs)
    fs.move(tmp, path)
    return dropped


def _result_files(uri: str) -> list[str]:
    return [f for f in storage.find(uri) if f.endswith(".parquet")] if storage.exists(uri) else []


#: The columns `result_parts` reads by default: a row's key within its plan, and whether it failed.
KEY_COLUMNS = ("sample_id", "method", "target", "error")

#: Result files read together: the driver holds one such part at a time (about 150,000 rows
#: of key columns at a batch size of 256 and ten methods, 5 MB), whatever the run's size.
FILES_PER_PART = 64


def result_parts(uri: str, *, repair: bool = True, drop_failed: bool = False,
                 columns=KEY_COLUMNS) -> Iterator[pa.Table]:
    """The `columns` of the rows under `uri`, a part of `FILES_PER_PART` files at a time.

    repair: remove files that cannot be read (what a killed writer leaves), so their rows are
    computed again. drop_failed: rewrite files without their failed rows, so those are retried.
    """
    # An explicit schema: files written before the `target` column existed read it as null
    # (= "label", below) instead of failing the read.
    schema = _columns_schema(columns)
    fs = storage.filesystem(uri)[0]

    def read(file: str) -> pa.Table | None:
        try:
            part = pads.dataset(storage.filesystem(file)[1], schema=schema, filesystem=fs,
                                format="parquet").to_table()
        except Exception as err:
            if not repair:
                raise
            print(f"removing unreadable result file {storage.redact(file)} ({type(err).__name__}); "
                  "its rows will be computed again", file=sys.stderr)
            storage.rm(file)
            return None
        if drop_failed and part.column("error").null_count < part.num_rows:
            _rewrite_without(file, lambda t: pc.is_valid(t.column("error")))
            part = part.filter(pc.is_null(part.column("error")))
        return part

    # File by file, not one dataset over the directory: a directory-wide scan holds every
    # file's Parquet metadata (60-odd columns each) until it ends; reading the four key columns
    # of 391 files that way left the driver 97 MB larger, file by file 10 MB (measured once,
    # 2026-12-02). Threads, because on S3 a read waits on the network.
    files = _result_files(uri)
    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, len(files), FILES_PER_PART):
            parts = [part for part in pool.map(read, files[start:start + FILES_PER_PART]) if part is not None]
            if parts:
                table = pa.concat_tables(parts)
                yield _label_default(table) if "target" in columns else table


def existing_rows(uri: str, *, repair: bool = True, drop_failed: bool = False,
                  columns=KEY_COLUMNS) -> pa.Table:
    """All of `result_parts` as one table (a run's size in memory: for tests and small runs)."""
    parts = list(result_parts(uri, repair=repair, drop_failed=drop_failed, columns=columns))
    return pa.concat_tables(parts) if parts else _columns_schema(columns).empty_table()


def _columns_schema(columns) -> pa.Schema:
    return pa.schema([RESULTS.field(c) for c in columns])


def _label_default(table: pa.Table) -> pa.Table:
    i = table.schema.get_field_index("target")
    return table.set_column(i, "target", pc.fill_null(table.column(i), DEFAULTS["target"]))


def remove_method_rows(config: RunConfig, methods: set[str]) -> int:
    """Delete every row of `methods` in this run (all datasets and models); returns how many."""
    value_set = pa.array(sorted(methods), pa.string())
    return sum(_rewrite_without(f, lambda t: pc.is_in(t.column("method"), value_set=value_set))
               for f in _result_files(run_uri(config.output, config.run_id)))


def sample_ids(uri: str, *, labels: bool = False) -> pa.Table:
    """The `sample_id` column of a samples directory (and `label`, with `labels=True`), as Arrow."""
    fs, path = storage.filesystem(uri)
    columns = ["sample_id", "label"] if labels else ["sample_id"]
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table(columns=columns)


def _rank(seed: int, value) -> bytes:
    return hashlib.blake2b(f"{seed}\x00{value}".encode(), digest_size=8).digest()


def balanced_subset(ids: list[str], labels: list, size: int, seed: int = 0) -> list[str]:
    """`size` sample ids, class-balanced, chosen by `seed` (sorted by id).

    Within each class the samples are ranked by a seeded hash of their id, and the classes are
    ordered by a seeded hash of the label; the subset takes each class's first-ranked sample,
    then each class's second, and so on, until `size`. It depends only on the set of (id, label)
    pairs and the seed: not on file order, shard layout or Ray's ordering. Classes differ by at
    most one sample, unless a class runs out."""
    by_class: dict = defaultdict(list)
    for sid, label in zip(ids, labels):
        by_class[label].append(sid)
    classes = sorted(by_class, key=lambda c: (_rank(seed, f"class:{c}"), str(c)))
    ranked = [sorted(by_class[c], key=lambda sid: (_rank(seed, sid), sid)) for c in classes]
    chosen: list[str] = []
    for depth in range(max((len(r) for r in ranked), default=0)):
        for members in ranked:
            if depth < len(members):
                chosen.append(members[depth])
                if len(chosen) == size:
                    return sorted(chosen)
    return sorted(chosen)


def select_samples(dataset: DatasetSpec, samples_uri: str) -> pa.Array:
    """The sample ids a dataset entry selects, sorted: its `subset`, then the first `limit` by id.

    Arrow throughout (a `subset` aside, whose hashing is Python's): the driver holds about the
    ids' bytes, not a Python object per sample."""
    table = sample_ids(samples_uri, labels=dataset.subset is not None)
    ids = table.column("sample_id").combine_chunks()
    # Arrow orders strings by their UTF-8 bytes, which is Python's order of code points.
    order = pc.array_sort_indices(ids)
    ids = pc.take(ids, order)
    # Duplicates are neighbours once sorted (a hash count of distinct ids took 30 MB at 100k).
    repeated = pc.equal(ids.slice(1), ids.slice(0, len(ids) - 1)) if len(ids) > 1 else pa.array([], pa.bool_())
    if pc.any(repeated).as_py():
        dupes = pc.unique(pc.filter(ids.slice(1), repeated)).to_pylist()[:5]
        raise ValueError(f"dataset {dataset.name!r}: sample_id is not unique (e.g. {dupes})")
    if dataset.subset is not None:
        chosen = balanced_subset(ids.to_pylist(), pc.take(table.column("label"), order).to_pylist(),
                                 dataset.subset.size, dataset.subset.seed)
        ids = pa.array(chosen, pa.string())  # sorted
    return ids.slice(0, dataset.limit) if dataset.limit else ids


def missing_work(dataset: DatasetSpec, samples_uri: str, methods: list[str],
                 done: pa.Table | Iterable[pa.Table], targets=("label",)) -> pa.Table:
    """The selected samples that miss rows: `sample_id` (sorted) and `todo`, the (method, target)
    rows each misses as comma-separated `todo_entry`s, in the order of `methods` × `targets`.

    `done`: the rows there are (`sample_id`, `method`, `target`), one table or parts of them
    (`result_parts`). Each part's rows become positions that mark a boolean table of wanted
    entries × selected samples and are dropped: the driver holds the selected ids and that
    table, a few dozen bytes per sample, and no Python object per sample or row."""
    selected = select_samples(dataset, samples_uri)
    targets = list(targets)
    wanted_methods, wanted_targets = pa.array(methods, pa.string()), pa.array(targets, pa.string())
    have = np.zeros((len(methods) * len(targets), len(selected)), dtype=bool)
    for part in [done] if isinstance(done, pa.Table) else done:
        where = pc.index_in(part.column("sample_id"), value_set=selected)
        method = pc.index_in(part.column("method"), value_set=wanted_methods)
        target = pc.index_in(pc.fill_null(part.column("target"), DEFAULTS["target"]), value_set=wanted_targets)
        counted = pc.and_(pc.and_(pc.is_valid(where), pc.is_valid(method)), pc.is_valid(target))
        where, method, target = (pc.filter(c, counted).to_numpy(zero_copy_only=False) for c in (where, method, target))
        have[method * len(targets) + target, where] = True
    todo = pa.nulls(len(selected), pa.string())
    for k, entry in enumerate(todo_entry(m, t) for m in methods for t in targets):
        # Appended by hand: binary_join_element_wise's null_handling="skip" drops rows that are
        # null in every input (pyarrow 26), which would misalign ids and work.
        joined = pc.if_else(pc.is_null(todo), entry, pc.binary_join_element_wise(todo, entry, ","))
        todo = pc.if_else(pa.array(have[k]), todo, joined)
    left = pc.is_valid(todo)
    return pa.table({"sample_id": pc.filter(selected, left), "todo": pc.filter(todo, left)})


def todo_rows(todo: pa.Table) -> int:
    """How many (sample, method, target) rows a `missing_work` table holds."""
    return len(todo) + int(pc.sum(pc.count_substring(todo.column("todo"), ",")).as_py() or 0)


# ------------------------------------------------------------------------------------------
# The plan


def _demo_samples(config: RunConfig) -> str:
    from .demo.samples import write_demo_samples

    target = storage.join(config.output, "_samples", "demo")
    if not storage.is_remote(target):
        write_demo_samples(target)
        return target
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = write_demo_samples(tmp)
        storage.write_bytes(storage.join(target, os.path.basename(str(path))), open(path, "rb").read())
    return target


def resolve_samples(config: RunConfig, dataset: DatasetSpec) -> str:
    return _demo_samples(config) if dataset.uri == DEMO_URI else dataset.uri


def _select(batch: pa.Table, ids: pa.Array, missing: pa.Array) -> pa.Table:
    """Keeps the samples that still miss rows, with a `todo` column naming the methods they
    miss (comma-separated): a cheap CPU stage before the model actors, and the work list
    travels with the data, so a restarted actor needs nothing but its config."""
    where = pc.index_in(batch.column("sample_id"), value_set=ids)  # null: nothing left to do
    keep = pc.is_valid(where)
    return batch.filter(keep).append_column("todo", pc.take(missing, where.filter(keep)))


def evaluate_plan(config: RunConfig, dataset: DatasetSpec, model: ModelSpec, samples_uri: str,
                  todo: pa.Table) -> None:
    import ray
    from ray.data import ActorPoolStrategy

    from .decode import decode_batch
    from .decode import geometry as decode_geometry
    from .evaluate import Evaluator

    c = config.compute
    fs, path = storage.filesystem(samples_uri)
    ds = ray.data.read_parquet(path, filesystem=fs, partitioning=None)
    ds = ds.select_columns(["sample_id", "split", "image", "label", "label_name", "boxes"])
    ds = ds.map_batches(_select, fn_kwargs={"ids": todo.column("sample_id").combine_chunks(),
                                            "missing": todo.column("todo").combine_chunks()},
                        batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    # Parquet reads bin-pack row groups into ~128 MiB blocks; one block would be one actor task
    # whose rows come out only at its end. Blocks of one batch each spread the work over the
    # actors and stream the rows to storage batch by batch.
    ds = ds.repartition(target_num_rows_per_block=c.batch_size)
    # Decoding and preprocessing in CPU tasks of their own (`pipeline.decode`), one batch per
    # task: the streaming executor runs them while the actors compute, so an actor's next batch
    # is decoded before it asks, and a GPU never idles behind JPEG decoding. The blocks then
    # carry the network's input, not the encoded image. Task count: by default as many as the
    # free CPUs allow, throttled by Ray Data's backpressure on the actors' input queue, so
    # decoding runs ahead of the GPUs by a bounded number of batches.
    model_kwargs = {"name": model.name, "key": model.key, **model.load_kwargs()}
    preprocess = dataset.preprocess.model_dump() if dataset.preprocess else None
    ds = ds.map_batches(decode_batch, fn_kwargs=decode_geometry(model_kwargs, preprocess), batch_size=None,
                        batch_format="pyarrow", num_cpus=c.decode_cpus, concurrency=c.decode_tasks)
    gpus = c.gpus_per_actor if _cluster_gpus() > 0 else 0
    ds = ds.map_batches(
        Evaluator,
        fn_constructor_kwargs=dict(
            run_id=config.run_id, dataset=dataset.name,
            model=model_kwargs,
            methods=config.methods_for(model), metrics=config.metrics, save_maps=config.save_maps,
            targets=list(config.targets),
            preprocess=preprocess,
            threads=max(1, int(c.cpus_per_actor)) if not gpus else None,
            precision=c.precision, compile=c.compile,
        ),
        batch_size=c.batch_size, batch_format="pyarrow",
        # On the actor's own thread: Ray Data's default moves a sync UDF onto a helper thread,
        # where torch's CPU kernels ran 10-40% slower (measured on the Evaluator alone); one
        # call at a time per actor either way, so a GPU never sees two batches at once.
        compute=ActorPoolStrategy(size=c.actors, enable_true_multi_threading=True),
        num_gpus=gpus or None, num_cpus=c.cpus_per_actor, resources=c.resources or None,
    )
    out_fs, out_path = storage.filesystem(plan_uri(config.output, config.run_id, dataset.name, model.key))
    # About one file per batch: rows reach storage as batches finish, so a crash loses little.
    ds.write_parquet(out_path, filesystem=out_fs,
                     max_rows_per_file=c.batch_size * len(config.methods_for(model)) * len(config.targets))


def _cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


# ------------------------------------------------------------------------------------------
# The run


@dataclass
class RunSummary:
    run_id: str
    uri: str
    counts: dict = field(default_factory=dict)  # (dataset, model, method, target) → (ok, failed)
    computed: int = 0                            # (sample, method, target) rows computed by this call
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(f for _ok, f in self.counts.values())

    @property
    def ok(self) -> int:
        return sum(o for o, _f in self.counts.values())

    def table(self) -> str:
        lines = [f"{'dataset':<16} {'model':<24} {'method':<12} {'target':<7} {'rows':>7} {'failed':>7}"]
        for (d, m, meth, target), (ok, bad) in sorted(self.counts.items()):
            lines.append(f"{d:<16} {m:<24} {meth:<12} {target:<7} {ok + bad:>7} {bad:>7}")
        lines.append(f"{self.ok} rows succeeded, {self.failed} failed; {self.computed} computed in this "
                     f"invocation ({self.seconds:.1f} s). Results: {storage.redact(self.uri)}")
        return "\n".join(lines)


def local_cpus(cores: int | None = None) -> int:
    """Logical CPUs of a local Ray: more than the cores, so Ray Data's read and write tasks
    (I/O, not compute) never starve behind the actors."""
    return max(4, 2 * (cores or os.cpu_count() or 1))


def ensure_ray(address: str | None = None, *, min_cpus: int = 0) -> None:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray with `local_cpus()`
    logical CPUs, at least `min_cpus` (what the caller's workers reserve)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(local_cpus(), min_cpus))


def read_manifest(config: RunConfig) -> dict:
    uri = storage.join(run_uri(config.output, config.run_id), MANIFEST)
    if not storage.exists(uri):
        return {}
    try:
        return json.loads(storage.read_text(uri))
    except ValueError:
        return {}


def _write_manifest(config: RunConfig, samples: dict[str, str] | None = None, **extra) -> None:
    """OUT/run=ID/_run.json: the resolved config (datasets' `uri` where their samples really are,
    `source` what the config said), the fingerprint of every (dataset, model, method) the run
    holds, start and end, row counts; the report reads it."""
    uri = storage.join(run_uri(config.output, config.run_id), MANIFEST)
    old = read_manifest(config)
    resolved = config.to_dict()
    for d in resolved["datasets"]:
        d["source"], d["uri"] = d["uri"], (samples or {}).get(d["name"], d["uri"])
    # Plans of earlier invocations stay recorded: their rows are still in the run.
    prints = {**old.get("fingerprints", {}), **fingerprints(config)}
    manifest = {**old, "run_id": config.run_id, "config": resolved, "fingerprints": prints, **extra}
    # the manifest is shared with whoever reads the results: no credential written into a URI
    storage.write_text(uri, storage.redact(json.dumps(manifest, indent=2, default=str)))


def describe_cost(config: RunConfig, throughput=None) -> str:
    """Per plan, the model evaluations per image its methods and metrics imply (`opticam_core.cost`),
    × the images where the dataset entry fixes their number (`subset`, `limit`), and the GPU-hours
    they come to at `throughput` (a `pipeline.throughput.Throughput`, measured; else the stated
    FLOP assumption), in total and against issue 14's nightly goal. No weights are loaded: each
    model's architecture is read on the meta device. An estimate that fails says so and fails
    nothing: the config itself is valid."""
    from opticam_core.cost import model_info, per_image

    from . import throughput as tp

    precision = config.compute.precision
    total, unknown = 0.0, []
    out = []
    for dataset, model, methods in config.plans():
        try:
            info = model_info(model.name, model.layer, model.num_classes)
            table = per_image({k: config.methods[k] for k in methods}, config.metrics, info)
        except Exception as err:  # noqa: BLE001  (a cost declaration's bug must not refuse a valid config)
            out.append(f"[{dataset.name} × {model.key}] cost not estimated: {type(err).__name__}: {err}")
            continue
        sizes = [n for n in (dataset.subset and dataset.subset.size, dataset.limit) if n]
        about = [f"K = {info.channels}" if info.channels else "",
                 f"{info.gflops:.1f} GFLOP per forward" if info.gflops else "", *info.notes]
        out.append(f"[{dataset.name} × {model.key}] model evaluations per image"
                   + (f" ({'; '.join(a for a in about if a)})" if any(about) else "") + ":")
        out.append(table.format(min(sizes) if sizes else None, gflops=info.gflops, targets=len(config.targets)))
        seconds, source = tp.seconds_per_equivalent(throughput, model.name, precision, info.gflops)
        per = table.equivalents * len(config.targets) * seconds if seconds is not None else math.nan
        if not sizes or math.isnan(per):
            unknown.append(model.key)
            out.append(f"  GPU time: {per * 1e3:,.1f} ms per image at {precision} ({source}); "
                       + ("not estimated" if sizes else "the number of images is not fixed (no subset or limit)"))
            continue
        hours = per * min(sizes) / 3600
        total += hours
        out.append(f"  GPU time: {hours:,.2f} GPU-hours ({per * 1e3:,.1f} ms per image) at {precision}; "
                   f"{source}; a floor: see pipeline/throughput.py")
    plans = len(config.plans())
    if plans > len(unknown):
        c = config.compute
        gpus = c.actors * c.gpus_per_actor
        out.append(f"GPU time in total: {total:,.2f} GPU-hours" + (f" over {plans - len(unknown)} of {plans} plans "
                                                                  f"(not {', '.join(unknown)})" if unknown else "")
                   + (f" = {total / gpus:,.2f} h on this config's {gpus:g} GPUs" if gpus else "") + "; "
                   + tp.goal_line(total))
    return "\n".join(out)


def check_configuration(config: RunConfig, replace: set[str] = frozenset()) -> None:
    """Refuse (RunConflict) a rerun whose configuration changed for a (dataset, model, method) the
    run already holds, except for the methods in `replace`. Reads the manifest only."""
    unknown = sorted(set(replace) - set(config.methods))
    if unknown:
        raise ConfigError(f"--replace {', '.join(unknown)}: not a method of this config "
                          f"({', '.join(config.methods)})")
    recorded = read_manifest(config).get("fingerprints") or {}
    found = changes(recorded, fingerprints(config), ignore_methods=set(replace))
    if found:
        raise RunConflict(conflict_message(config.run_id, found))


def count_rows(config: RunConfig) -> dict:
    """(dataset, model, method, target) → (rows fine, rows failed), counted part by part."""
    counts = {}
    for dataset, model, run_methods in config.plans():
        seen: Counter = Counter()
        for part in result_parts(plan_uri(config.output, config.run_id, dataset.name, model.key), repair=False,
                                 columns=("method", "target", "error")):
            grouped = (pa.table({"method": part.column("method"), "target": part.column("target"),
                                 "ok": pc.is_null(part.column("error"))})
                       .group_by(["method", "target", "ok"]).aggregate([("ok", "count")]))
            seen.update({(m, t, ok): n for m, t, ok, n in zip(*(grouped.column(c).to_pylist()
                                                                for c in ("method", "target", "ok", "ok_count")))})
        for method in run_methods:
            for target in config.targets:
                counts[(dataset.name, model.key, method, target)] = (seen[(method, target, True)],
                                                                    seen[(method, target, False)])
    return counts


def run(config: RunConfig, *, address: str | None = None, retry_failed: bool = False,
        replace: set[str] | list[str] = (), log=print) -> RunSummary:
    """Evaluate every (dataset, model) plan of `config`; compute only what is missing (and,
    with `retry_failed`, what failed before). `replace`: methods whose rows in this run are
    deleted first and computed again. Raises RunConflict, before touching anything, when the
    configuration changed for rows the run holds (see `check_configuration`)."""
    t0 = time.perf_counter()
    replace = set(replace)
    check_configuration(config, replace)
    if replace:
        log(f"--replace: deleted {remove_method_rows(config, replace)} rows of {', '.join(sorted(replace))}")
    ensure_ray(address)
    started = datetime.now(timezone.utc).isoformat()
    samples = {d.name: resolve_samples(config, d) for d in config.datasets}
    _write_manifest(config, samples, started=started, finished=None, status="running")
    summary = RunSummary(config.run_id, run_uri(config.output, config.run_id))
    for dataset, model, methods in config.plans():
        samples_uri = samples[dataset.name]
        dest = plan_uri(config.output, config.run_id, dataset.name, model.key)
        todo = missing_work(dataset, samples_uri, methods, result_parts(dest, drop_failed=retry_failed),
                            config.targets)
        pending = todo_rows(todo)
        log(f"[{dataset.name} × {model.key}] {len(todo)} samples with {pending} (sample, method, target) rows "
            "to compute")
        if len(todo):
            evaluate_plan(config, dataset, model, samples_uri, todo)
            summary.computed += pending
    summary.counts = count_rows(config)
    summary.seconds = time.perf_counter() - t0
    _write_manifest(config, samples, finished=datetime.now(timezone.utc).isoformat(), status="finished",
                    rows_ok=summary.ok, rows_failed=summary.failed)
    return summary


# ------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="run config (YAML); see cluster/configs/")
    parser.add_argument("--run-id", help="run id (default: the config's, else a timestamp); reuse one to resume")
    parser.add_argument("--output", help="results root, local or s3:// (overrides the config's)")
    parser.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument("--throughput", metavar="FILE",
                        help="with --check: the measured per-model throughput table (`python -m benchmarks.gpu` "
                             "writes it) for the GPU-hours estimate; default: benchmarks/throughput.json under the "
                             "current directory if present, else an assumed H100 throughput (said so)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="with an existing run id: compute the failed rows again (they are replaced)")
    parser.add_argument("--replace", action="append", default=[], metavar="METHOD",
                        help="with an existing run id whose configuration changed for METHOD: delete its rows "
                             "of this run and compute them again (repeat, or comma-separate, for several)")
    parser.add_argument("--fail-on-errors", action="store_true",
                        help="exit 1 when some rows failed (default: 0; failed rows are in the results)")


def _check_against_manifest(config: RunConfig, replace: set[str]) -> None:
    """`--check` validates offline too (a laptop without the cluster's credentials): when the
    output cannot be read, it says so and skips only the comparison with the run's manifest,
    which the run itself makes before any work."""
    try:
        check_configuration(config, replace)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001  (no credentials, no network, no bucket: all the same here)
        print(f"note: the run's manifest under {storage.redact(config.output)} could not be read "
              f"({storage.redact(f'{type(err).__name__}: {err}')[:300]}); the check against the rows this run "
              f"already holds is left to the run itself", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, run_id=args.run_id, output=args.output)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return 2
    replace = {m for value in args.replace for m in value.split(",") if m}
    try:
        if args.check:
            _check_against_manifest(config, replace)
            plans = config.plans()
            print(f"config OK: {len(plans)} (dataset, model) plans, {sum(len(m) for *_, m in plans)} "
                  f"(dataset, model, method) combinations" + (f", each for {len(config.targets)} targets "
                                                              f"({', '.join(config.targets)})"
                                                              if len(config.targets) > 1 else ""))
            from .throughput import ThroughputError, find

            try:
                table = find(args.throughput)
            except ThroughputError as err:
                print(err, file=sys.stderr)
                return 2
            print(describe_cost(config, table))
            return 0
        check_configuration(config, replace)
        summary = run(config, address=args.address, retry_failed=args.retry_failed, replace=replace)
    except ConfigError as err:  # RunConflict included: exit 2, nothing touched
        print(err, file=sys.stderr)
        return 2
    print(summary.table())
    return 1 if args.fail_on_errors and summary.failed else 0
