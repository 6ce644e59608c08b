"""The largest connected component of many binary masks at once, in torch, on their device.

The localization metrics need, for every image and every threshold, the bounding box of the
largest connected component of a thresholded map: B images × 101 thresholds × H×W pixels. A
per-image scipy/cv2 call would leave the device and loop in Python, so components are found in
parallel, on horizontal runs of foreground pixels rather than on pixels:

- a run (a maximal horizontal segment of foreground) lies inside one component, and a smooth
  saliency map has 1–3 runs per row, so the run graph is ~100× smaller than the pixel grid;
- runs of adjacent rows are joined when their column ranges touch;
- labels spread over that graph by hook-and-shortcut propagation (parallel union–find): each
  round every run takes the smallest label among its neighbours, hooks its root onto it
  (scatter-min) and halves its parent chain twice (gather). Labels only decrease and never leave
  their component, so at the fixed point each component carries its smallest run index.
  Rounds grow like the logarithm of the component's extent for blob-like masks (5–10 here); a
  spiral needs more, and the loop still ends at the exact labelling.

Connectivity: 8 by default, that of cv2.findContours, which Choe et al.'s wsolevaluation (box
accuracy) uses. 4 is available: scipy.ndimage.label's default, used by the CASME-derived code
that the Opti-CAM authors adapted for their mean-threshold box.

"Largest" counts pixels. Ties between equally large components go to the one whose first pixel
in raster order (row-major) comes first. (wsolevaluation ranks cv2 contours by polygon area,
which can differ from the pixel count by a fraction of the perimeter.)
"""

from __future__ import annotations

import torch

CONNECTIVITIES = (4, 8)


def largest_component_boxes(masks: torch.Tensor, connectivity: int = 8, *,
                            budget: int = 2 ** 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounding box of the largest connected component of each of N binary H×W masks.

    Returns (boxes N×4 float as (x0, y0, x1, y1) in pixel-edge coordinates: the component's
    pixels span columns x0 … x1−1 and rows y0 … y1−1; sizes N int64, the component's pixel count).
    An empty mask gives the box (0, 0, 0, 0) and size 0.

    Works on horizontal runs of foreground pixels rather than on pixels (see `_run_components`);
    `budget` bounds the elements of the run-adjacency tensor of one chunk of masks.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if masks.dim() != 3:
        raise ValueError(f"masks must be N×H×W, got shape {tuple(masks.shape)}")
    N, H, W = masks.shape
    dev = masks.device
    boxes = torch.zeros(N, 4, device=dev)
    sizes = torch.zeros(N, dtype=torch.long, device=dev)
    if N == 0 or H == 0 or W == 0:
        return boxes, sizes

    # Runs: a start is a foreground pixel whose left neighbour is not; an end, whose right one is
    # not. nonzero lists both in raster order, so the k-th start and the k-th end bound run k.
    fg = masks.bool()
    starts = fg.clone()
    starts[..., 1:] &= ~fg[..., :-1]
    ends = fg.clone()
    ends[..., :-1] &= ~fg[..., 1:]
    n_, i_, first = starts.nonzero(as_tuple=True)
    last = ends.nonzero(as_tuple=True)[2]
    row = n_ * H + i_
    per_row = torch.bincount(row, minlength=N * H)
    r_ = torch.arange(len(row), device=dev) - (per_row.cumsum(0) - per_row)[row]  # run index in its row
    per_mask = per_row.view(N, H).sum(1)
    widest = per_row.view(N, H).amax(1).clamp_min(1).tolist()
    bounds = [0] + per_mask.cumsum(0).tolist()

    # Chunks of masks: smooth maps have 1–3 runs per row and go in large chunks; noisy masks
    # with many runs per row go in smaller ones, so the R×R run adjacency stays within budget.
    start = 0
    while start < N:
        stop, R = start, 1
        while stop < N:
            r = max(R, widest[stop])
            if stop > start and (stop - start + 1) * H * r * r > budget:
                break
            R, stop = r, stop + 1
        k = slice(bounds[start], bounds[stop])
        boxes[start:stop], sizes[start:stop] = _run_components(
            stop - start, H, W, R, n_[k] - start, i_[k], r_[k], first[k], last[k], connectivity)
        start = stop
    return boxes, sizes


def _run_components(N, H, W, R, n_, i_, r_, first_col, last_col, connectivity: int):
    """Largest component of each of N masks, given their horizontal runs.

    Every maximal horizontal run of foreground pixels lies inside one component, so components
    are found on the graph of runs (run a of row i touches run b of row i+1 when their column
    ranges overlap, or, under 8-connectivity, are diagonal neighbours) by hook-and-shortcut label
    propagation. A smooth map has 1–3 runs per row: the graph is ~100× smaller than the pixels.
    Run q = i·R + r is the r-th run (left to right) of row i; a component's label is its smallest
    q, the run that holds its first pixel in raster order.
    """
    dev = first_col.device
    first = torch.full((N, H, R), W, device=dev, dtype=torch.long)
    last = torch.full((N, H, R), -1, device=dev, dtype=torch.long)
    first[n_, i_, r_] = first_col
    last[n_, i_, r_] = last_col
    valid = last >= 0

    # touch[n, i, a, b]: run a of row i and run b of row i+1 are connected (missing runs have
    # first = W > last = −1, so they touch nothing).
    gap = 1 if connectivity == 8 else 0
    touch = ((first[:, 1:, None, :] <= last[:, :-1, :, None] + gap)
             & (first[:, :-1, :, None] <= last[:, 1:, None, :] + gap))

    HR = H * R
    none = HR  # the label of missing runs, and the sentinel parent that is its own parent
    label = torch.full((N, HR + 1), none, device=dev, dtype=torch.long)
    label[:, :HR] = torch.where(valid.reshape(N, HR), torch.arange(HR, device=dev), none)
    big = torch.tensor(none, device=dev)
    while True:
        grid = label[:, :HR].view(N, H, R)
        near = grid.clone()
        # R is small: a loop over run slots beats a reduction over a tiny trailing dimension.
        for b in range(R):
            below = torch.where(touch[..., b], grid[:, 1:, b, None], big)  # row i sees run b of row i+1
            near[:, :-1] = torch.minimum(near[:, :-1], below)
            above = torch.where(touch[:, :, b, :], grid[:, :-1, b, None], big)  # row i+1 sees run b of row i
            near[:, 1:] = torch.minimum(near[:, 1:], above)
        near = near.reshape(N, HR)
        new = label.clone()
        new[:, :HR] = torch.minimum(new[:, :HR], near)
        # hook: the root of my tree adopts the smallest label next to me
        new.scatter_reduce_(1, label[:, :HR], near, reduce="amin")
        # shortcut: jump twice along the parent chain
        new = new.gather(1, new)
        new = new.gather(1, new)
        if torch.equal(new, label):
            break
        label = new

    length = torch.where(valid, last - first + 1, 0).reshape(N, HR)
    counts = torch.zeros(N, HR + 1, device=dev, dtype=torch.long)
    counts.scatter_add_(1, label[:, :HR], length)
    # argmax returns the first maximal index: among equal sizes, the component that starts first.
    sizes, best = counts[:, :HR].max(dim=1)
    member = (label[:, :HR] == best[:, None]).view(N, H, R) & valid
    rows = torch.arange(H, device=dev)[None, :, None].expand(N, H, R)
    x0 = torch.where(member, first, W).flatten(1).amin(1)
    x1 = torch.where(member, last, -1).flatten(1).amax(1) + 1
    y0 = torch.where(member, rows, H).flatten(1).amin(1)
    y1 = torch.where(member, rows, -1).flatten(1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    boxes = torch.where((sizes > 0)[:, None], boxes, torch.zeros_like(boxes))
    return boxes, sizes
