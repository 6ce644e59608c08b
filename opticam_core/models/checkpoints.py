"""State dicts from a local path, an fsspec URI (``s3://…``) or a mapping, loaded into a network
only when every tensor fits."""

from __future__ import annotations

import io
import re
from collections import OrderedDict
from typing import Mapping

import torch
from torch import nn

from .errors import ModelError


def read_checkpoint(checkpoint) -> Mapping[str, torch.Tensor]:
    """The state dict in `checkpoint`, unwrapped and with the usual key prefixes removed."""
    state = checkpoint if isinstance(checkpoint, Mapping) else _torch_load(str(checkpoint))
    if not isinstance(state, Mapping):
        raise ModelError(f"checkpoint holds a {type(state).__name__}, not a state dict")
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("checkpoint is not a state dict of tensors")
    if any(k.startswith("net.") for k in state):
        # A saved `bundle.model` (the Normalized wrapper): its mean/std buffers are not the net's.
        state = {k: v for k, v in state.items() if k not in ("mean", "std")}
    prefix = re.compile(r"^(module\.|net\.|model\.)")
    return OrderedDict((prefix.sub("", k), v) for k, v in state.items())


def _torch_load(uri: str):
    try:
        if "://" not in uri:
            return torch.load(uri, map_location="cpu", weights_only=True)
        # Imported here: the core needs fsspec (and s3fs for s3://) only for checkpoint URIs.
        import fsspec

        with fsspec.open(uri, "rb") as fh:
            return torch.load(io.BytesIO(fh.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise ModelError(f"checkpoint not found: {uri}") from err
    except ImportError as err:
        raise ModelError(f"cannot read checkpoint {uri}: {err}. Reading URIs needs fsspec, and s3fs for "
                         "s3:// (both come with `pip install 'opticam[job]'`); or pass a local path") from err
    except Exception as err:
        raise ModelError(f"cannot read checkpoint {uri}: {type(err).__name__}: {err}") from err


def load_checkpoint(net: nn.Module, checkpoint, name: str) -> None:
    """Load `checkpoint` into `net`; ModelError lists what does not fit (and hints num_classes=)."""
    state = read_checkpoint(checkpoint)
    own = net.state_dict()
    # Old checkpoints (torchvision's own ResNet/VGG files among them) predate BatchNorm's
    # num_batches_tracked; load_state_dict fills it in, so it is not missing.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    heads = [(k, state[k].shape[0], own[k].shape[0]) for k in own
             if k in state and re.search(r"(^|\.)(fc|classifier|head)(\.|$)", k) and k.endswith("weight")
             and state[k].dim() == own[k].dim() and state[k].shape[1:] == own[k].shape[1:]
             and state[k].shape[0] != own[k].shape[0]]
    if heads:  # the usual mistake: the run config's num_classes is not the one the model was trained with
        k, theirs, ours = heads[-1]
        raise ModelError(f"checkpoint does not fit {name!r}: its classifier has {theirs} classes ({k} "
                         f"{tuple(state[k].shape)}), the model built here has {ours} ({tuple(own[k].shape)}); "
                         f"pass num_classes={theirs} (in a run config, the model's num_classes: {theirs})")
    if missing or unexpected or mismatched:
        lines = [f"checkpoint does not fit {name!r}:"]
        if mismatched:
            lines.append("  shape mismatches: " + "; ".join(mismatched[:5]))
            if any(re.search(r"(fc|classifier|head)", m) for m in mismatched):
                lines.append("  (a different number of classes? pass num_classes=)")
        if missing:
            lines.append(f"  missing {len(missing)} keys, e.g. {missing[:5]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys, e.g. {unexpected[:5]}")
        raise ModelError("\n".join(lines))
    net.load_state_dict(state)
