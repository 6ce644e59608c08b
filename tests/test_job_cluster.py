"""The job on real Ray clusters: `ray job submit` to a head started with `ray start`, work spread
over several nodes (ray.cluster_utils.Cluster), a node lost mid-run, a driver killed mid-run.
Every check is on the rows: each (sample, method) exactly once, none missing."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.dataset as pads
import pytest
import yaml

from pipeline.config import load_config
from pipeline.job import plan_uri, run, run_uri
from tests._peers import require
from tests._samples import photo_rows, toy_config, write_samples

ray = require("ray")
pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
METHODS = {"fakecam": {}, "gradcam": {}}


def rows_of(uri: str):
    return pads.dataset(uri, format="parquet", partitioning=None).to_table(
        columns=["sample_id", "method", "error"]).to_pandas()


def assert_complete(uri: str, n_samples: int, methods=METHODS):
    df = rows_of(uri)
    counts = collections.Counter(zip(df.sample_id, df.method))
    assert len(counts) == n_samples * len(methods), f"{len(counts)} distinct rows, expected {n_samples * len(methods)}"
    assert set(counts.values()) == {1}, "a row was written twice"
    assert df.error.isna().all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_venv() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"  # Ray 2.60 turns token auth on for local clusters
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(autouse=True)
def no_ray_in_process():
    if ray.is_initialized():
        ray.shutdown()
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_ray_job_submit_to_a_head_on_loopback(tmp_path):
    samples = write_samples(tmp_path / "samples", photo_rows(6), row_group=2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(toy_config(str(samples), str(tmp_path / "out"), methods=METHODS)))
    env = env_with_venv()
    port, dash = free_port(), free_port()
    ray_bin = str(VENV_BIN / "ray")
    start = subprocess.run(
        [ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        for attempt in range(6):
            submit = subprocess.run(
                [ray_bin, "job", "submit", f"--address=http://127.0.0.1:{dash}",
                 f"--submission-id=opticam-test-{attempt}",
                 "--", str(VENV_BIN / "opticam"), "run", str(config), "--run-id", "submitted"],
                env=env, capture_output=True, text=True, timeout=900)
            log = submit.stdout + submit.stderr
            # the head's job agent can start after its dashboard on a busy machine: Ray asks to retry
            if submit.returncode == 0 or "No available agent to submit job" not in log:
                break
            time.sleep(5)
        assert submit.returncode == 0, log
        assert "succeeded" in log.lower()
        assert "12 rows succeeded, 0 failed" in log
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    assert_complete(run_uri(str(tmp_path / "out"), "submitted"), 6)


#: Set (by `Cluster.add_node(env_vars=...)`) on the node the test will remove: the path of a journal.
STALL = "OPTICAM_TEST_STALL_JOURNAL"


def stall_on_marked_node():
    """A Ray worker setup hook. On the marked node the Evaluator journals each batch it is
    given (its node and sample ids) and never finishes it, so that node's actor is certainly in
    the middle of known batches when the node goes, and none of its rows can have been written."""
    journal = os.environ.get(STALL)
    if not journal:
        return
    from pipeline import evaluate

    def stalled(self, batch):
        entry = {"node": ray.get_runtime_context().get_node_id(), "samples": batch.column("sample_id").to_pylist()}
        with open(journal, "a") as f:
            f.write(json.dumps(entry) + "\n")
        threading.Event().wait()

    evaluate.Evaluator.__call__ = stalled


def readable_keys(dest: str) -> set:
    """(sample, method) of every result file that can be read now (the job may be mid-write)."""
    keys = set()
    for name in os.listdir(dest) if os.path.isdir(dest) else []:
        if name.endswith(".parquet"):
            try:
                t = pads.dataset(os.path.join(dest, name), format="parquet").to_table(columns=["sample_id", "method"])
            except Exception:  # a file being written: not there yet
                continue
            keys |= set(zip(t.column("sample_id").to_pylist(), t.column("method").to_pylist()))
    return keys


def test_work_spreads_over_nodes_and_survives_losing_one(tmp_path):
    from ray.cluster_utils import Cluster

    n = 16
    samples = write_samples(tmp_path / "samples", photo_rows(n), row_group=2)
    journal = tmp_path / "stalled.jsonl"
    # Reads, selects and writes need CPUs, which only the head has; each worker node has room
    # for exactly one actor, so the two actors sit on the two nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    cluster.add_node(num_cpus=0, resources={"evaluator": 1})
    doomed = cluster.add_node(num_cpus=0, resources={"evaluator": 1}, env_vars={STALL: str(journal)})
    cluster.wait_for_nodes()
    try:
        # the hook travels by value: workers cannot import this test module
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": stall_on_marked_node})
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        spec = toy_config(str(samples), str(tmp_path / "out"), methods=METHODS, actors=2, batch_size=2)
        spec["compute"].update(cpus_per_actor=0, resources={"evaluator": 1})
        cfg = load_config(spec, run_id="lose-node")
        dest = plan_uri(cfg.output, "lose-node", "toy", "test_efficientnet")
        errors = []

        def go():
            try:
                run(cfg, log=lambda *_: None)
            except Exception as err:  # reported below
                errors.append(err)

        job = threading.Thread(target=go, daemon=True)  # a hung job must not hang pytest's exit
        job.start()
        deadline = time.time() + 600
        while time.time() < deadline and job.is_alive() and not (journal.exists() and readable_keys(dest)):
            time.sleep(0.5)
        assert journal.exists(), f"no batch reached the doomed node's actor (job errors: {errors})"
        assert readable_keys(dest), "the other node's actor wrote no rows"
        # Room for the lost actor to come back, then lose the node while the job waits on it.
        cluster.add_node(num_cpus=0, resources={"evaluator": 1})
        cluster.wait_for_nodes()
        stalled = [json.loads(line) for line in journal.read_text().splitlines()]
        assert {e["node"] for e in stalled} == {doomed.node_id}
        lost = {(sid, m) for e in stalled for sid in e["samples"] for m in METHODS}
        assert job.is_alive(), "the job ended before the node was removed"
        before = readable_keys(dest)
        assert before and lost and not before & lost  # rows written, rows still missing
        removed_at = pd.Timestamp.now(tz="UTC")
        cluster.remove_node(doomed)
        job.join(timeout=600)
        assert not job.is_alive(), "the job did not finish after losing a node"
        assert not errors, errors
        assert_complete(run_uri(cfg.output, "lose-node"), n)
        rows = pads.dataset(dest, format="parquet").to_table(columns=["sample_id", "method", "created"]).to_pandas()
        redone = rows[[k in lost for k in zip(rows.sample_id, rows.method)]]
        # the lost actor's batches: each (sample, method) once, computed after the node was gone
        assert len(redone) == len(lost) and (redone.created > removed_at).all()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_killed_driver_costs_time_not_rows(tmp_path):
    n = 16
    samples = write_samples(tmp_path / "samples", photo_rows(n), row_group=1)
    spec = toy_config(str(samples), str(tmp_path / "out"), methods=METHODS, batch_size=1)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(spec))
    dest = plan_uri(str(tmp_path / "out"), "killed", "toy", "test_efficientnet")
    env = env_with_venv()
    proc = subprocess.Popen([str(VENV_BIN / "opticam"), "run", str(config), "--run-id", "killed"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            files = [f for f in os.listdir(dest)] if os.path.isdir(dest) else []
            if len([f for f in files if f.endswith(".parquet")]) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed; give it more work"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, at once
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([str(VENV_BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    before = rows_of(run_uri(str(tmp_path / "out"), "killed"))
    assert 0 < len(before) < n * len(METHODS)
    summary = run(load_config(spec, run_id="killed"), log=lambda *_: None)
    assert summary.computed == n * len(METHODS) - len(before)
    assert_complete(run_uri(str(tmp_path / "out"), "killed"), n)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
