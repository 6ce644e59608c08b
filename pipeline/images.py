"""The one image decoder: the evaluation, the ingest check and the report read pixels here.

Policy, the same wherever bytes are read:
- An image above `MAX_PIXELS` is refused from its header, before a pixel is decoded, with a
  `ValueError` (the evaluation turns it into an `error` row, the ingest skips the file).
- Grayscale, palette, alpha and CMYK files become RGB by PIL's own conversion.
- High-bit-depth single-channel files (PIL modes I;16*, I, F) are scaled, not clipped: 16-bit
  0–65535 maps to 0–255 (an `I` image whose values exceed 255 counts as 16-bit), floats in
  [0,1] map to 0–255, and non-finite values are an error. 16-bit RGB(A) files PIL itself reads
  as 8-bit (their high byte).
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

#: Decoding and the evaluation's preprocessing hold roughly 20 bytes per pixel at their peak
#: (PIL's 4-byte RGB buffer, the array, the tensor, the resize's float copy): 10 000 × 10 000
#: pixels is about 2 GB in one actor, and far more than any photo of the paper's datasets.
MAX_PIXELS = 10_000 * 10_000

# PIL's own guard, for any code in the process that opens images directly, agrees with ours;
# its warning between the limit and twice the limit would only repeat the error raised below.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def open_image(data: bytes) -> Image.Image:
    """The image of encoded bytes with its header read and no pixel decoded yet (a context
    manager). ValueError when PIL cannot identify it or it is larger than `MAX_PIXELS`."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ValueError(f"image larger than {MAX_PIXELS} pixels (decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL's ways of saying "not an image"
        raise ValueError(f"not a decodable image ({_pil_message(err)})") from None
    width, height = img.size
    if width * height > MAX_PIXELS:
        img.close()
        raise ValueError(f"image of {width}x{height} pixels is larger than {MAX_PIXELS} "
                         "(decompression-bomb limit)")
    return img


def load(img: Image.Image) -> None:
    """Decode the pixels of an `open_image` result; ValueError when the body is corrupt."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"not a decodable image ({_pil_message(err)})") from None


def decode_image(data: bytes) -> "torch.Tensor":
    """Encoded bytes → uint8 3×H×W tensor, by the module's policy."""
    import torch

    with open_image(data) as img:
        load(img)
        if img.mode in _HIGH_DEPTH:
            gray = np.round(_unit(img) * 255.0).astype(np.uint8)
            rgb = np.repeat(gray[..., None], 3, axis=2)
        else:
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"decoded image has shape {rgb.shape}")
    # the channels-first copy is needed anyway, and it is writable where PIL's buffer is not
    return torch.from_numpy(np.array(rgb.transpose(2, 0, 1), order="C"))


def decode_gray(data: bytes) -> np.ndarray:
    """Encoded single-channel bytes (a stored saliency map) → float32 H×W in [0,1], keeping a
    16-bit file's precision: 8-bit by /255, 16-bit by /65535."""
    with open_image(data) as img:
        load(img)
        if img.mode in _HIGH_DEPTH:
            return _unit(img).astype(np.float32)
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def _unit(img: Image.Image) -> np.ndarray:
    """A high-bit-depth single-channel image as float64 in [0,1]."""
    arr = np.asarray(img, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("image has non-finite pixel values")
    peak = float(arr.max()) if arr.size else 0.0
    if img.mode.startswith("I;16") or peak > 255:
        top = 65535.0
    elif img.mode == "F" and peak <= 1:
        top = 1.0
    else:
        top = 255.0
    return np.clip(arr / top, 0.0, 1.0)


def _pil_message(err: BaseException) -> str:
    # PIL appends the object's repr (" <_io.BytesIO object at 0x...>"), which differs per call
    return f"{type(err).__name__}: {str(err).split(' <')[0]}"
