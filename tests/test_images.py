"""The one image decoder (pipeline/images.py) that the evaluation, the ingest check and the report
share: awkward files against PIL's own conversion of the same bytes, high bit depths by the
documented scaling, and the pixel limit refused from the header, before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image, ImageFile

from pipeline.datasets.writer import BadImage, inspect_image
from pipeline.evaluate import Evaluator
from pipeline.images import MAX_PIXELS, decode_gray, decode_image, open_image
from pipeline.report.figures import decode_map
from pipeline.schema import SAMPLES
from tests._samples import TOY_MODEL, photo_rows

RNG = np.random.default_rng(4)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (5, 7), dtype=np.uint8)


def save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def hwc(data: bytes) -> np.ndarray:
    out = decode_image(data)
    assert out.dtype == torch.uint8 and out.shape[0] == 3
    return out.permute(1, 2, 0).numpy()


def pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _palette() -> Image.Image:
    img = Image.fromarray(RGB).quantize(colors=6)
    img.info["transparency"] = 2
    return img


# file → what its pixels must be, worked out without PIL's conversion
AWKWARD = {
    "grayscale": (lambda: save(Image.fromarray(RGB[..., 0])), lambda: np.repeat(RGB[..., :1], 3, axis=2)),
    "bilevel": (lambda: save(Image.fromarray(RGB[..., 0] > 127)),
                lambda: np.repeat(np.where(RGB[..., :1] > 127, 255, 0), 3, axis=2)),
    "gray_alpha": (lambda: save(Image.fromarray(np.stack([RGB[..., 1], ALPHA], -1), mode="LA")),
                   lambda: np.repeat(RGB[..., 1:2], 3, axis=2)),  # alpha dropped, not composited
    "rgba": (lambda: save(Image.fromarray(np.dstack([RGB, ALPHA]), mode="RGBA")), lambda: RGB),
    "palette": (lambda: save(_palette()),
                lambda: np.asarray(_palette().getpalette(), np.uint8).reshape(-1, 3)[np.asarray(_palette())]),
    "cmyk_tiff": (lambda: save(Image.fromarray(RGB).convert("CMYK"), "TIFF"), lambda: RGB),
    "cmyk_jpeg": (lambda: save(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95), None),  # lossy
    "one_pixel": (lambda: save(Image.fromarray(RGB[:1, :1])), lambda: RGB[:1, :1]),
    "one_gray_pixel": (lambda: save(Image.fromarray(RGB[:1, :1, 2])), lambda: np.repeat(RGB[:1, :1, 2:], 3, axis=2)),
}


@pytest.mark.parametrize("name", AWKWARD)
def test_awkward_files_decode_as_pil_converts_them(name):
    make, expected = AWKWARD[name]
    data = make()
    got = hwc(data)
    np.testing.assert_array_equal(got, pil_rgb(data))
    if expected is not None:
        np.testing.assert_array_equal(got, expected())


def test_cmyk_jpeg_is_not_inverted():
    # Adobe CMYK JPEGs store inverted ink; a decoder that got it wrong gives the negative
    data = AWKWARD["cmyk_jpeg"][0]()
    assert np.abs(hwc(data).astype(int) - RGB).mean() < 20


def test_16_bit_gray_is_scaled_not_clipped():
    values = np.array([[0, 1, 128, 129, 257, 32767, 32768, 65534, 65535]], dtype=np.uint16)
    data = save(Image.fromarray(values))
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "I;16"
    expected = np.round(values * 255.0 / 65535.0).astype(np.uint8)
    assert expected.tolist() == [[0, 0, 0, 1, 1, 127, 128, 255, 255]]
    got = hwc(data)
    assert (got == expected[..., None]).all()
    # the report reads a 16-bit map with its precision: v / 65535
    np.testing.assert_allclose(decode_gray(data), values / 65535.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(decode_map(data), values / 65535.0, rtol=0, atol=1e-7)


def test_16_bit_rgb_keeps_the_high_byte():
    wide = RNG.integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    # PNG stores 16-bit samples big-endian; PIL reduces 16-bit RGB to 8 bits when it reads it
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in wide)
    data = _png(6, 4, bit_depth=16, color=2, idat=zlib.compress(raw))
    assert np.abs(hwc(data).astype(int) - np.round(wide / 257.0)).max() <= 1


def test_other_high_depth_modes():
    ints = np.array([[0, 100, 255]], dtype=np.int32)  # an "I" image within 8 bits stays as it is
    assert hwc(save(Image.fromarray(ints, mode="I"), "TIFF"))[..., 0].tolist() == [[0, 100, 255]]
    wide = np.array([[0, 1000, 65535]], dtype=np.int32)  # beyond 8 bits: read as 16-bit
    assert hwc(save(Image.fromarray(wide, mode="I"), "TIFF"))[..., 0].tolist() == [[0, 4, 255]]
    unit = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)  # floats in [0,1]
    assert hwc(save(Image.fromarray(unit, mode="F"), "TIFF"))[..., 0].tolist() == [[0, 128, 255]]
    with pytest.raises(ValueError, match="non-finite"):
        decode_image(save(Image.fromarray(np.array([[0.0, np.nan]], np.float32), mode="F"), "TIFF"))
    assert decode_map(None) is None
    np.testing.assert_allclose(decode_map(save(Image.fromarray(RGB[..., 0]))), RGB[..., 0] / 255.0, atol=1e-7)


def test_not_an_image():
    for data in (b"", b"GIF89a nonsense", b"\x89PNG\r\n\x1a\n"):
        with pytest.raises(ValueError, match="not a decodable image"):
            decode_image(data)
    truncated = save(Image.fromarray(RGB), "JPEG")[:-200]
    with pytest.raises(ValueError, match="(?i)truncated"):
        decode_image(truncated)


# --------------------------------------------------------------------------------------------
# The pixel limit (decompression bombs)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(width: int, height: int, *, bit_depth: int = 8, color: int = 0, idat: bytes | None = None) -> bytes:
    """A PNG whose header claims width × height; a few hundred bytes whatever it claims."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0)
    body = zlib.compress(b"\x00" * (width + 1)) if idat is None else idat  # one row at most
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError(f"pixels of a {self.size} image were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("size", [(10_000, 10_001), (100_000, 100_000)],
                         ids=["just_above", "far_above"])  # PIL warns for the first, refuses the second
def test_images_above_the_pixel_limit_are_refused_from_the_header(size, no_pixel_decoding):
    assert size[0] * size[1] > MAX_PIXELS
    bomb = _png(*size)
    assert len(bomb) < 200_000
    for decode in (decode_image, decode_gray):
        with pytest.raises(ValueError, match="decompression-bomb limit"):
            decode(bomb)
    for check in ("header", "decode"):  # the ingest skips the file, whatever its check
        with pytest.raises(BadImage, match="decompression-bomb limit"):
            inspect_image(bomb, check)


def test_an_image_at_the_limit_is_accepted(no_pixel_decoding):
    with open_image(_png(10_000, 10_000)) as img:
        assert img.size == (10_000, 10_000) and img.size[0] * img.size[1] == MAX_PIXELS


def test_a_bomb_in_a_batch_is_an_error_row():
    rows = photo_rows(2)
    rows[0] = {**rows[0], "sample_id": "bomb", "image": _png(20_000, 6_000)}
    ev = Evaluator(run_id="r", dataset="toy", model=TOY_MODEL, methods={"fakecam": {}}, metrics={}, device="cpu")
    out = ev(pa.Table.from_pylist(rows, schema=SAMPLES)).to_pandas().set_index("sample_id")
    assert out.loc["bomb", "error"] == (f"ValueError: image of 20000x6000 pixels is larger than {MAX_PIXELS} "
                                        "(decompression-bomb limit)")
    assert out["error"].isna().sum() == 1  # the batch went on
