"""The training loop, the same code under Ray Train (one DDP rank per worker) and in one process
(`LocalSession`: the benchmark's reference, world size 1).

Determinism (what a resumed run shares with an uninterrupted one): the initial head comes from
`seed`; each epoch's sample order comes from (seed, epoch) and its flips and dropout from (seed,
epoch, rank), never from state carried across epochs, so a run resumed from the checkpoint of
epoch k draws what the uninterrupted run drew from epoch k+1 on (with the same number of
workers: each rank's share of an epoch depends on it). The checkpoint holds the network, the
optimiser state and the history. What can still differ: GPU kernels that are not
deterministic (cuDNN's convolution backward picks algorithms per run; set
CUBLAS_WORKSPACE_CONFIG and torch.use_deterministic_algorithms for bitwise equality at a speed
cost), and the order of DDP's gradient all-reduce buckets across more than two ranks.

Stage `train: head` trains the last linear classifier only; the frozen rest of the network also
keeps its BatchNorm statistics and has dropout off (it runs in eval mode), like a frozen Keras
base. Stage `train: all` trains every parameter in train mode.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from opticam_core import load_model
from opticam_core.models.networks import classifier
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.data import DataError, load_split

STATE_FILE = "state.pt"


# ------------------------------------------------------------------------------------------
# What the loop needs from its runner


class LocalSession:
    """One process, no DDP: the reference the benchmark compares Ray Train with."""

    rank, world = 0, 1

    def __init__(self, device: str | None = None, state: dict | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.state, self.reports = state, []

    def checkpoint(self) -> dict | None:
        return self.state

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reports.append(metrics)
        if state is not None:
            self.state = state

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def wrap(self, model: nn.Module) -> nn.Module:
        return model


class RaySession:
    """Inside a Ray Train worker: torch.distributed is set up by TorchTrainer."""

    def __init__(self, fallback_checkpoint: str | None = None):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.fallback = fallback_checkpoint

    def checkpoint(self) -> dict | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        if self.fallback:  # --resume of a run whose Ray state was not found: our own last checkpoint
            return read_state(self.fallback)
        return None

    def report(self, metrics: dict, state: dict | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(t)
        return t

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)


def read_state(uri: str) -> dict:
    """A checkpoint's state (a local folder or URI holding `state.pt`)."""
    import io

    from pipeline import storage

    return torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, STATE_FILE))), map_location="cpu",
                      weights_only=True)


# ------------------------------------------------------------------------------------------
# The network


def head_names(net: nn.Module) -> set[str]:
    """Parameter names of the classifier head (the one `replace_head` replaced)."""
    head = classifier(net)
    if head is None or not list(head.parameters()):
        raise DataError(f"stages: cannot find the linear classifier of {type(net).__name__} to train alone; "
                        "use `train: all`")
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in net.named_parameters() if id(p) in ids}


def build_model(config: FinetuneConfig, device) -> nn.Module:
    """The network inside its normalisation (`Normalized`, as the evaluation runs it), trainable."""
    m = config.model
    torch.manual_seed(config.seed)  # the new head's initialisation
    bundle = load_model(m.name, weights=m.weights, num_classes=m.num_classes, layer=m.layer or None,
                        device=device)
    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _optimizer(stage, params):
    if stage.optimizer == "adam":
        return torch.optim.Adam(params, lr=stage.lr, weight_decay=stage.weight_decay)
    return torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)


def _seed(*parts: int) -> int:
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s


# ------------------------------------------------------------------------------------------
# The loop


def evaluate(model: nn.Module, split, session, n: int, batch: int) -> torch.Tensor:
    """The confusion matrix (rows: label, columns: prediction) over every rank's share."""
    dev = session.device
    conf = torch.zeros(n * n, dtype=torch.int64, device=dev)
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(split), batch):
            x = split.images[lo:lo + batch].to(dev, non_blocking=True).float().div_(255)
            y = split.labels[lo:lo + batch].to(dev)
            pred = model(x).argmax(1)
            conf += torch.bincount(y * n + pred, minlength=n * n)
    return session.all_reduce(conf).view(n, n).cpu()


def run(config: FinetuneConfig, session, *, log: Callable[[str], None] = print, hooks: dict | None = None) -> dict:
    """Train (from the session's checkpoint when there is one), evaluate on test; returns the
    final state (also reported as the last checkpoint)."""
    hooks = hooks or {}
    rank, world, dev = session.rank, session.world, session.device
    n = config.model.num_classes
    pre = config.preprocess.kwargs()
    threads = config.compute.cpus_per_worker
    d = config.data
    t0 = time.perf_counter()
    train = load_split(d.train.uri, d.train.split, pre, threads=threads)
    val = load_split(d.val.uri, d.val.split, pre, shard=(rank, world), threads=threads)
    test = load_split(d.test.uri, d.test.split, pre, shard=(rank, world), threads=threads)
    sizes = session.all_reduce(torch.tensor([len(val), len(test), len(val.skipped), len(test.skipped)]))
    skipped = {"train": len(train.skipped), "val": int(sizes[2]), "test": int(sizes[3])}
    for name, size in (("train", len(train)), ("val", int(sizes[0])), ("test", int(sizes[1]))):
        if size == 0:
            raise DataError(f"data.{name}: none of the split's images decode ({skipped[name]} skipped)")
    if rank == 0:
        log(f"finetune: {len(train)} train, {int(sizes[0])} val, {int(sizes[1])} test images "
            f"(skipped as undecodable: {skipped}) ready in {time.perf_counter() - t0:.1f} s on {world} worker(s)")

    model = build_model(config, dev)
    net = model.net
    head = head_names(net)
    state = session.checkpoint()
    start, history, resumed = 0, [], []
    if state is not None:
        net.load_state_dict(state["model"])
        start, history, resumed = int(state["epoch"]), list(state["history"]), list(state.get("resumed", []))
        if start < config.epochs or "test" not in state:
            resumed.append(start)
        if rank == 0:
            log(f"finetune: resuming after epoch {start} of {config.epochs}")
    if state is not None and "test" in state:
        session.report({"epoch": start, "done": True}, state if rank == 0 else None)
        return state

    current, ddp, opt = None, None, None
    for epoch in range(start, config.epochs):
        si = config.stage_of(epoch)
        stage = config.stages[si]
        if si != current:
            for name, p in net.named_parameters():
                p.requires_grad_(stage.train == "all" or name in head)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = _optimizer(stage, params)
            if state is not None and state.get("stage") == si and state.get("optimizer"):
                opt.load_state_dict(state["optimizer"])
            ddp = None  # the previous stage's DDP goes first: its reducer hooks the same parameters
            ddp = session.wrap(model)
            current = si
        per_rank = stage.batch_size // world
        started = time.time()  # epoch k's wall time, checkpoint included: started[k+1] - started[k]
        record = _train_epoch(ddp, opt, train, stage, per_rank, config, epoch, session)
        record["started"] = started
        conf = evaluate(model, val, session, n, max(per_rank, 64))
        record.update(epoch=epoch + 1, stage=si, val_accuracy=float(conf.diag().sum() / conf.sum()))
        history.append(record)
        if rank == 0:
            log(f"finetune: epoch {epoch + 1}/{config.epochs} (stage {si + 1} {stage.name or stage.train}) "
                f"loss {record['train_loss']:.4f} train acc {record['train_accuracy']:.3f} "
                f"val acc {record['val_accuracy']:.3f} {record['images_per_s']:.1f} images/s")
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1, "stage": si,
                 "history": history, "skipped": skipped, "resumed": resumed}
        session.report(dict(record), state if rank == 0 else None)
        if hooks.get("fail_once") and _fail_once(hooks["fail_once"], epoch + 1, session):
            raise RuntimeError(f"test hook: worker {rank} lost after epoch {epoch + 1}")
        if hooks.get("stop_after") == epoch + 1:
            return {"stopped": epoch + 1}

    conf = evaluate(model, test, session, n, 64)
    state = {"model": net.state_dict(), "epoch": config.epochs, "stage": len(config.stages) - 1,
             "history": history, "skipped": skipped, "resumed": resumed,
             "test": {"accuracy": float(conf.diag().sum() / conf.sum()), "confusion": conf}}
    if rank == 0:
        log(f"finetune: test accuracy {state['test']['accuracy']:.4f} on {int(conf.sum())} images")
    session.report({"epoch": config.epochs, "test_accuracy": state["test"]["accuracy"], "done": True},
                   state if rank == 0 else None)
    return state


def _train_epoch(model, opt, train, stage, batch, config, epoch, session) -> dict:
    rank, world, dev = session.rank, session.world, session.device
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_seed(config.seed, epoch)))
    per = math.ceil(len(train) / world)
    order = order.repeat(math.ceil(per * world / len(train)))[:per * world]  # equal shares, like DistributedSampler
    mine = order[rank::world]
    torch.manual_seed(_seed(config.seed, epoch, rank, 1))  # dropout
    flips = torch.Generator().manual_seed(_seed(config.seed, epoch, rank, 2))
    model.train(stage.train == "all")
    sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss × n, correct, n
    start = time.perf_counter()
    for lo in range(0, per, batch):
        idx = mine[lo:lo + batch]
        x = train.images[idx]
        if config.augment.hflip:
            x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=flips) < 0.5, x.flip(3), x)
        if config.augment.vflip:
            x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=flips) < 0.5, x.flip(2), x)
        x = x.to(dev, non_blocking=True).float().div_(255)
        y = train.labels[idx].to(dev, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sums += torch.stack([loss.detach().double() * len(idx), (logits.argmax(1) == y).sum().double(),
                                 torch.tensor(float(len(idx)), device=dev, dtype=torch.float64)])
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    sums = session.all_reduce(sums).cpu()
    return {"train_loss": float(sums[0] / sums[2]), "train_accuracy": float(sums[1] / sums[2]),
            "images": int(sums[2]), "seconds": round(seconds, 3), "images_per_s": float(sums[2]) / seconds}


def _fail_once(marker: str, epoch_done: int, session) -> bool:
    """Test hook `{"fail_once": "EPOCH:PATH"}`: the last rank raises once after that epoch, once
    Ray Train holds the epoch's checkpoint. Raising straight after `report` races rank 0's upload:
    the controller sees the error first, drops the unfinished round, and the restart begins from
    the previous checkpoint (seen in CI with checkpoints on S3)."""
    at, _, path = marker.partition(":")
    if epoch_done != int(at):
        return False
    last = session.rank == session.world - 1
    fail = torch.tensor([int(last and not os.path.exists(path))], device=session.device)
    if not int(session.all_reduce(fail).item()):
        return False
    # a rank's results queue holds one report: the next report returns only once the controller
    # has taken the previous one, so after it and a barrier every rank's checkpoint report is in
    session.report({"epoch": epoch_done, "hook": "fail_once"}, None)
    session.all_reduce(torch.zeros(1, device=session.device))
    if not last:
        return False
    Path(path).write_text("failed once\n")
    return True


def _quiet_reports() -> None:
    """Ray Train 2.60 logs every report (its metrics and checkpoint) at INFO from each rank, on a
    logger named by its file, which RunConfig's LoggingConfig does not reach: the driver's log
    would hold two such lines per rank and epoch beside ours."""
    import logging

    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:  # another Ray: its own logging
        return
    for name in (context.__file__, storage.__name__):
        logging.getLogger(name).setLevel(logging.WARNING)


def worker_loop(loop_config: dict) -> None:
    """TorchTrainer's `train_loop_per_worker`."""
    config = FinetuneConfig.model_validate(loop_config["config"])
    torch.set_num_threads(config.compute.cpus_per_worker)
    _quiet_reports()
    session = RaySession(loop_config.get("fallback_checkpoint"))
    # sys.stdout, not print: Ray Train patches print into its logger and the line would show twice
    run(config, session, log=lambda m: (sys.stdout.write(m + "\n"), sys.stdout.flush()), hooks=loop_config.get("hooks"))
