"""Memory-aware chunking (`opticam_core.chunking`): the GPU's chunk from its free memory and the
model's measured memory per image, and an out-of-memory error on a chunk halving it instead of
failing the batch. No GPU here: the device's memory is faked, and so is the out-of-memory error
(a forward that raises `torch.OutOfMemoryError` above a batch size), which is how it reaches the
loops on a real device."""

from __future__ import annotations

import pytest
import torch

from opticam_core import chunking, explain
from opticam_core.methods import extremal as ex
from opticam_core.metrics.aopc import region_perturbation
from opticam_core.metrics.box_study import box_study
from opticam_core.metrics.causal import insertion_deletion
from opticam_core.metrics.selectivity import selectivity

from . import _toys

OOM = torch.OutOfMemoryError


class MemoryLimit:
    """A forward pre-hook on the model: more than `limit` images in one forward raise the error
    CUDA raises. Records every batch size seen."""

    def __init__(self, model, limit: int):
        self.limit, self.seen = limit, []
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        n = args[0].shape[0]
        self.seen.append(n)
        if n > self.limit:
            raise OOM(f"CUDA out of memory (simulated: {n} > {self.limit} images)")

    def assert_halved(self) -> None:
        """The first chunk too large was halved until it fitted, and no later one was too large."""
        over = [i for i, n in enumerate(self.seen) if n > self.limit]
        assert over, f"no forward exceeded {self.limit} images: {self.seen}"
        k = over[0]
        while self.seen[k] > self.limit:
            assert self.seen[k + 1] == self.seen[k] // 2, self.seen
            k += 1
        assert max(self.seen[k:]) <= self.limit, self.seen

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------
# The helpers


def test_run_chunks_halves_on_out_of_memory_and_covers_every_item_once():
    done, tried = torch.zeros(37, dtype=torch.long), []

    def body(start, stop):
        tried.append(stop - start)
        if stop - start > 5:
            raise OOM("simulated")
        done[start:stop] += 1

    final = chunking.run_chunks(37, 32, body)
    assert final == 4 and tried[:4] == [32, 16, 8, 4]  # halved until it fits, then kept
    assert done.tolist() == [1] * 37


def test_run_chunks_raises_at_one_item_and_passes_other_errors():
    def never(start, stop):
        raise OOM("simulated")

    with pytest.raises(OOM):
        chunking.run_chunks(3, 8, never)
    calls = []

    def broken(start, stop):
        calls.append(stop - start)
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError):
        chunking.run_chunks(10, 8, broken)
    assert calls == [8]  # no retry for other errors


def test_with_halving_returns_the_size_that_worked():
    result, size = chunking.with_halving(lambda n: n if n <= 10 else (_ for _ in ()).throw(OOM("x")), 64)
    assert (result, size) == (8, 8)
    with pytest.raises(OOM):
        chunking.with_halving(lambda n: (_ for _ in ()).throw(OOM("x")), 4)


# ---------------------------------------------------------------------------------------------
# The GPU's chunk size, with the device faked


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device with 1 GB free (as mem_get_info plus the allocator's cache would say) and a
    model whose forward costs 1 MB per image (2 MB with the backward)."""
    calls = []

    def measure(fn, example, *, grad):
        calls.append((tuple(example.shape), grad))
        return 2_000_000 if grad else 1_000_000

    monkeypatch.setattr(chunking, "measure_peak", measure)
    monkeypatch.setattr(chunking, "free_bytes", lambda device: 1_000_000_000)
    return calls


def test_gpu_chunk_from_free_memory_and_measured_activations(fake_gpu):
    bundle = _toys.cnn_bundle(dtype=torch.float32)
    x = _toys.images(4, dtype=torch.float32)
    size = dict(cpu=8, fallback=128, device="cuda")
    # half of 1 GB over 1 MB per image: 500
    assert chunking.chunk_size(bundle.model, x, **size) == 500
    # the loop's own tensors count too: 1 MB + 0.25 MB per item
    assert chunking.chunk_size(bundle.model, x, extra_bytes=250_000, **size) == 400
    assert chunking.chunk_size(bundle.model, x, grad=True, **size) == 250
    # measured once per (model, shape, dtype, grad, ...), on one image
    assert fake_gpu == [((1, 3, 32, 32), False), ((1, 3, 32, 32), True)]
    chunking.chunk_size(bundle.model, _toys.images(2, size=48, dtype=torch.float32), **size)
    assert len(fake_gpu) == 3  # another input size is another measurement
    # bounded by the items there are, and by MAX_CHUNK; an explicit size wins; never below 1
    assert chunking.chunk_size(bundle.model, x, limit=37, **size) == 37
    assert chunking.chunk_size(bundle.model, x, requested=3, **size) == 3
    assert chunking.by_memory("cuda", 1) == chunking.MAX_CHUNK
    assert chunking.by_memory("cuda", 10**12) == 1
    # the CPU keeps its constant; a device that cannot report its memory, the fallback
    assert chunking.chunk_size(bundle.model, x, cpu=8, fallback=128) == 8
    assert chunking.chunk_size(bundle.model, x, cpu=8, fallback=128, device="mps") == 128


def test_another_precision_is_measured_apart(fake_gpu):
    from opticam_core.precision import precision

    bundle = _toys.cnn_bundle(dtype=torch.float32)
    x = _toys.images(2, dtype=torch.float32)
    chunking.chunk_size(bundle.model, x, cpu=8, fallback=128, device="cuda")
    with precision("bf16", bundle.model):  # bf16 activations: half the memory, its own measurement
        chunking.chunk_size(bundle.model, x, cpu=8, fallback=128, device="cuda")
    chunking.chunk_size(bundle.model, x, cpu=8, fallback=128, device="cuda")
    assert len(fake_gpu) == 2


def test_free_bytes_counts_the_allocators_cache(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3_000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 900)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 400)
    assert chunking.free_bytes(torch.device("cuda")) == 3_500


def test_metric_batch_size_from_memory(fake_gpu):
    from opticam_core.metrics._forward import resolve_batch_size

    bundle = _toys.cnn_bundle(dtype=torch.float32)
    x = _toys.images(2, dtype=torch.float32)
    # 1 MB per image + 3 images of 3×32×32 float32 per item
    per = 1_000_000 + 3 * 3 * 32 * 32 * 4
    got = resolve_batch_size(None, "cuda", model=bundle.model, example=x, copies=3.0)
    assert got == 500_000_000 // per
    assert resolve_batch_size(None, "cpu", model=bundle.model, example=x) == 8
    assert resolve_batch_size(None, "cuda") == 256  # no model given: the fallback
    assert resolve_batch_size(5, "cuda", model=bundle.model, example=x) == 5


# ---------------------------------------------------------------------------------------------
# Every chunked loop: a simulated out-of-memory error halves its chunk, the results do not move


METHODS = {
    "scorecam": {},
    "ablationcam": {"use_tail": False},  # full forwards: they go through the model's hook
    "lime": {"num_samples": 12, "quickshift_kernel_size": 2.0, "quickshift_max_dist": 10.0},
    "gradshap": {"n_samples": 6},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_out_of_memory_halves_the_chunk(method):
    bundle = _toys.cnn_bundle()
    x, t = _toys.images(2), _toys.targets(2)
    options = METHODS[method]
    want = explain(bundle, x, t, method, batch_size=3, **options)
    with MemoryLimit(bundle.model, limit=3) as limit:
        got = explain(bundle, x, t, method, batch_size=16, **options)
    limit.assert_halved()
    assert torch.allclose(got.maps, want.maps, rtol=0, atol=1e-12), method


def test_ablation_tail_out_of_memory_halves_the_chunk(monkeypatch):
    bundle = _toys.cnn_bundle()
    x, t = _toys.images(2), _toys.targets(2)
    want = explain(bundle, x, t, "ablationcam", batch_size=2)
    tail, seen = bundle.tail, []

    def small_tail(features):
        seen.append(features.shape[0])
        if features.shape[0] > 2:
            raise OOM("simulated")
        return tail(features)

    monkeypatch.setattr(bundle, "tail", small_tail)
    got = explain(bundle, x, t, "ablationcam", batch_size=16)
    assert seen[:4] == [16, 8, 4, 2]
    assert torch.allclose(got.maps, want.maps, rtol=0, atol=1e-12)


def _metric_runs(bundle, x, maps, t):
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 25.0]], dtype=torch.float64), torch.tensor([[0.0, 0.0, 16.0, 16.0]])]
    return {
        "insertion_deletion": lambda bs: insertion_deletion(bundle, x, maps, classes=t, steps=8, blur=(3, 1.0),
                                                            batch_size=bs)[:2],
        "aopc": lambda bs: region_perturbation(bundle, x, maps, t, patch_size=8, regions=6, batch_size=bs),
        "selectivity": lambda bs: selectivity(bundle, x, maps, t, alphas=(0.5, 1.0, 2.0), batch_size=bs),
        "box_study": lambda bs: tuple(box_study(bundle, x, maps, boxes, t, batch_size=bs).values()),
    }


@pytest.mark.parametrize("metric", ["insertion_deletion", "aopc", "selectivity", "box_study"])
def test_metric_out_of_memory_halves_the_chunk(metric):
    bundle = _toys.cnn_bundle()
    x, t = _toys.images(2), _toys.targets(2)
    maps = _toys.images(2, seed=5)[:, 0]
    run = _metric_runs(bundle, x, maps, t)[metric]
    want = run(2)
    with MemoryLimit(bundle.model, limit=2) as limit:
        got = run(16)
    limit.assert_halved()
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-12, equal_nan=True), metric


def test_extremal_pooling_out_of_memory_halves_the_block(monkeypatch):
    torch.manual_seed(3)
    gen = ex.SmoothMasks((40, 52), step=5, sigma=11.0)
    params = torch.rand(3, 1, *gen.grid)
    gm, gf = torch.rand(3, 1, 40, 52), torch.rand(3, 1, *gen.full)

    def run(budget):
        p = params.clone().requires_grad_(True)
        mask, full = gen(p, budget=budget)
        (grad,) = torch.autograd.grad((mask * gm).sum() + (full * gf).sum(), p)
        return mask, full, grad

    want = run(4000)
    blocks, budgets = ex._blocks, []

    def limited(rows, phases, per_phase, budget):
        budgets.append(budget)
        if budget > 5000:
            raise OOM("simulated")
        return blocks(rows, phases, per_phase, budget)

    monkeypatch.setattr(ex, "_blocks", limited)
    got = run(64000)
    assert budgets[:5] == [64000, 32000, 16000, 8000, 4000]  # forward halved to 4000
    assert budgets[5:] == [4000]                              # the backward starts where it worked
    for a, b in zip(got, want):
        assert torch.equal(a, b)
