"""Image records: decoding PNG/JPEG/.npy values and JSON envelopes, rejections, error summaries."""

from __future__ import annotations

import base64
import io

import numpy as np
import orjson
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.modalities.image import error_map_png, top_regions
from pipeline.modalities.images import (
    IMAGE_REASONS,
    DecodedImage,
    ImageDecoder,
    encode_image_record,
)
from pipeline.modalities.readings import REASONS, Rejection

GREY = (1, 8, 8)
RGB = (3, 8, 8)
MAX_BYTES = 64 * 1024
RECORD_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
KEY = b"cam-1"


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    """8x8 handwritten digits, values 0..16 (float64)."""
    return load_digits().images


def decode(shape, value, key=KEY, headers=None, ts=RECORD_TS, max_bytes=MAX_BYTES):
    return ImageDecoder(shape, max_bytes).decode(key, value, headers, ts)


def accepted(result) -> DecodedImage:
    assert isinstance(result, DecodedImage), result
    assert result.image.dtype == np.float32
    assert result.image.flags.c_contiguous
    return result


def rejected(result, reason: str) -> Rejection:
    assert isinstance(result, Rejection), result
    assert result.reason == reason, result
    return result


def envelope(**fields) -> bytes:
    return orjson.dumps(fields)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_of(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


# -- accepted records ---------------------------------------------------------------------------
def test_npy_round_trip_keeps_the_values_of_a_digit(digits):
    image = digits[7][np.newaxis].astype(np.float32)  # [1, 8, 8], 0..16
    result = accepted(decode(GREY, encode_image_record(image, "npy")))
    assert result.key == "cam-1"
    assert result.ts_ms == RECORD_TS
    assert result.image.shape == GREY
    np.testing.assert_array_equal(result.image, image)
    assert result.image.max() == 16.0  # no rescaling


def test_npy_layouts_hw_hwc_and_chw(digits):
    flat = digits[3]  # [8, 8] float64
    np.testing.assert_array_equal(
        accepted(decode(GREY, encode_image_record(flat))).image, flat[np.newaxis]
    )
    chw = np.stack([digits[0], digits[1], digits[2]]).astype(np.int16)
    hwc = chw.transpose(1, 2, 0)
    from_hwc = accepted(decode(RGB, encode_image_record(hwc))).image
    from_chw = accepted(decode(RGB, encode_image_record(chw))).image
    np.testing.assert_array_equal(from_hwc, chw)
    np.testing.assert_array_equal(from_chw, chw)
    # a Fortran-ordered array decodes to the same pixels
    fortran = np.asfortranarray(chw.astype(np.float64))
    np.testing.assert_array_equal(accepted(decode(RGB, encode_image_record(fortran))).image, chw)


def test_png_greyscale_round_trip_in_pixel_units(digits):
    pixels = (digits[5] * 15).astype(np.uint8)  # 0..240
    result = accepted(decode(GREY, encode_image_record(pixels, "png")))
    np.testing.assert_array_equal(result.image, pixels[np.newaxis].astype(np.float32))
    assert result.image.max() == pixels.max() > 16  # 0..255 units, not rescaled to 0..1


def test_png_rgb_into_three_channels_keeps_channel_order():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=RGB, dtype=np.uint8)
    image[0] = 200  # channels distinguishable: R flat, G and B random
    result = accepted(decode(RGB, encode_image_record(image, "png")))
    np.testing.assert_array_equal(result.image, image.astype(np.float32))


def test_png_modes_are_conformed_to_the_model_channels():
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(4, 8, 8), dtype=np.uint8)
    got = accepted(decode(RGB, encode_image_record(rgba, "png"))).image
    np.testing.assert_array_equal(got, rgba[:3])  # alpha dropped for a 3-channel model
    got = accepted(decode((4, 8, 8), encode_image_record(rgba, "png"))).image
    np.testing.assert_array_equal(got, rgba)

    palette = Image.new("P", (8, 8))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    indices = rng.integers(0, 3, size=(8, 8), dtype=np.uint8)
    palette.putdata(indices.ravel().tolist())
    data = png_of(palette)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.float32)
    np.testing.assert_array_equal(
        accepted(decode(RGB, data)).image, colours[indices].transpose(2, 0, 1)
    )
    as_grey = np.asarray(palette.convert("L"), dtype=np.float32)
    np.testing.assert_array_equal(accepted(decode(GREY, data)).image[0], as_grey)

    grey_alpha = rng.integers(0, 256, size=(2, 8, 8), dtype=np.uint8)
    la = encode_image_record(grey_alpha, "png")
    np.testing.assert_array_equal(accepted(decode(GREY, la)).image[0], grey_alpha[0])
    np.testing.assert_array_equal(accepted(decode(RGB, la)).image, np.repeat(grey_alpha[:1], 3, 0))

    bilevel = Image.fromarray(indices == 1).convert("1")
    np.testing.assert_array_equal(
        accepted(decode(GREY, png_of(bilevel))).image[0], (indices == 1) * 255.0
    )


def test_sixteen_bit_png_keeps_its_range():
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000
    data = png_of(Image.fromarray(pixels))
    np.testing.assert_array_equal(accepted(decode(GREY, data)).image[0], pixels)


def test_jpeg_decodes_close_to_the_source(digits):
    pixels = (digits[9] * 15).astype(np.uint8)
    smooth = np.kron(pixels, np.ones((4, 4), dtype=np.uint8))  # 32x32, blocky but JPEG-friendly
    result = accepted(decode((1, 32, 32), encode_image_record(smooth, "jpeg")))
    assert np.abs(result.image[0] - smooth).mean() < 8.0


def test_json_envelope_with_base64_key_and_ts(digits):
    image = digits[11][np.newaxis]
    value = envelope(key="cam-9", ts="2026-01-01T00:00:01Z", image=b64(encode_image_record(image)))
    result = accepted(decode(GREY, value, key=None, ts=5))
    assert result.key == "cam-9"
    assert result.ts_ms == RECORD_TS + 1000
    np.testing.assert_array_equal(result.image, image)

    png = encode_image_record((digits[11] * 15).astype(np.uint8), "png")
    result = accepted(decode(GREY, b"  " + envelope(ts=RECORD_TS + 5, image=b64(png))))
    assert (result.key, result.ts_ms) == ("cam-1", RECORD_TS + 5)  # key from the message key


def test_timestamp_precedence_envelope_then_header_then_record(digits):
    raw = encode_image_record(digits[0])
    assert accepted(decode(GREY, raw)).ts_ms == RECORD_TS
    header_ms = [("other", b"1"), ("aewatch.ts", str(RECORD_TS + 7).encode())]
    assert accepted(decode(GREY, raw, headers=header_ms)).ts_ms == RECORD_TS + 7
    header_iso = [("aewatch.ts", b"2026-01-01T00:00:02Z")]
    assert accepted(decode(GREY, raw, headers=header_iso)).ts_ms == RECORD_TS + 2000
    header_naive = [("aewatch.ts", b"2026-01-01T00:00:03")]  # naive ISO is UTC
    assert accepted(decode(GREY, raw, headers=header_naive)).ts_ms == RECORD_TS + 3000

    in_envelope = envelope(ts=RECORD_TS + 9, image=b64(raw))
    assert accepted(decode(GREY, in_envelope, headers=header_ms)).ts_ms == RECORD_TS + 9
    no_ts = envelope(image=b64(raw))
    assert accepted(decode(GREY, no_ts, headers=header_ms)).ts_ms == RECORD_TS + 7
    assert accepted(decode(GREY, no_ts)).ts_ms == RECORD_TS


def test_key_precedence(digits):
    raw = encode_image_record(digits[0])
    assert accepted(decode(GREY, raw, key="kamera-ü".encode())).key == "kamera-ü"
    value = envelope(key="cam-1", image=b64(raw))
    assert accepted(decode(GREY, value, key=b"cam-1")).key == "cam-1"
    assert accepted(decode(GREY, envelope(key=42, image=b64(raw)), key=None)).key == "42"


# -- rejections ---------------------------------------------------------------------------------
UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Trap:
    """Unpickling one of these records that it happened."""

    def __reduce__(self):
        return (_record_unpickling, ("unpickled",))


def _pickled_object_npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Trap()] * 64, dtype=object).reshape(8, 8), allow_pickle=True)
    return buffer.getvalue()


def _truncated_npy() -> bytes:
    return encode_image_record(np.ones(GREY, dtype=np.float32))[:-10]


def _corrupt_png() -> bytes:
    data = bytearray(encode_image_record(np.arange(64, dtype=np.uint8).reshape(8, 8), "png"))
    start = data.index(b"IDAT") + 4
    data[start : start + 8] = b"\x00" * 8  # break the compressed stream and its CRC
    return bytes(data)


REJECTIONS = {
    "oversize": [
        (GREY, lambda: encode_image_record(np.zeros(GREY)), {"max_bytes": 100}),
    ],
    "decode_error": [
        (GREY, lambda: b"\x00\x01garbage bytes", {}),
        (GREY, lambda: b"", {}),
        (GREY, lambda: None, {}),
        (GREY, lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, {}),
        # a .npy header whose dict is never closed (numpy's header tokenizer raises TokenError)
        (GREY, lambda: encode_image_record(np.ones(GREY)).replace(b"}", b" ", 1), {}),
        (GREY, _corrupt_png, {}),
        (GREY, lambda: b"\xff\xd8\xff\xe0not really a jpeg", {}),
        (GREY, _truncated_npy, {}),
        (GREY, _pickled_object_npy, {}),
        (GREY, lambda: encode_image_record(np.ones(GREY, dtype=np.complex64)), {}),
        (GREY, lambda: b"\x93NUMPY\x01\x00\x10\x00{'descr': oops}  \n", {}),
        (GREY, lambda: b'{"key": "cam-1", "image": ', {}),
        (GREY, lambda: envelope(image="not base64!!"), {}),
        (GREY, lambda: envelope(image=b64(b"GIF89a....")), {}),
        (GREY, lambda: envelope(image=""), {}),
        (GREY, lambda: b"[1, 2, 3]", {}),
    ],
    "schema_mismatch": [
        (GREY, lambda: envelope(key="cam-1", ts=RECORD_TS), {}),
        (GREY, lambda: envelope(image=[1, 2, 3]), {}),
        (GREY, lambda: envelope(key="cam-2", image=b64(encode_image_record(np.ones(GREY)))), {}),
        (GREY, lambda: envelope(key=[1], image=b64(encode_image_record(np.ones(GREY)))), {}),
    ],
    "missing_key": [
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"key": None}),
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"key": b""}),
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"key": b"\xff\xfe"}),
        (GREY, lambda: envelope(image=b64(encode_image_record(np.ones(GREY)))), {"key": None}),
    ],
    "bad_timestamp": [
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"headers": [("aewatch.ts", b"soon")]}),
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"headers": [("aewatch.ts", None)]}),
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"headers": [("aewatch.ts", b"nan")]}),
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"ts": -1}),
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"ts": 10**15}),  # year 33658
        (GREY, lambda: encode_image_record(np.ones(GREY)), {"headers": [("aewatch.ts", b"1e15")]}),
        (GREY, lambda: envelope(ts=10**15, image=b64(encode_image_record(np.ones(GREY)))), {}),
        (GREY, lambda: envelope(ts="later", image=b64(encode_image_record(np.ones(GREY)))), {}),
        (GREY, lambda: envelope(ts=True, image=b64(encode_image_record(np.ones(GREY)))), {}),
    ],
    "image_shape": [
        (GREY, lambda: encode_image_record(np.ones((1, 8, 9))), {}),
        (GREY, lambda: encode_image_record(np.ones((2, 8, 8))), {}),
        (GREY, lambda: encode_image_record(np.ones((1, 1, 8, 8))), {}),
        (GREY, lambda: encode_image_record(np.ones(64)), {}),
        (RGB, lambda: encode_image_record(np.ones((8, 8))), {}),
        (GREY, lambda: encode_image_record(np.ones((16, 16), dtype=np.uint8), "png"), {}),
        (GREY, lambda: encode_image_record(np.ones(RGB, dtype=np.uint8), "png"), {}),
        (RGB, lambda: encode_image_record(np.ones((8, 8), dtype=np.uint8), "png"), {}),
        (GREY, lambda: encode_image_record(np.ones((4, 8, 8), dtype=np.uint8), "png"), {}),
        (GREY, lambda: encode_image_record(np.ones((8, 9), dtype=np.uint8), "jpeg"), {}),
    ],
    "non_finite": [
        (GREY, lambda: encode_image_record(np.full(GREY, np.nan, dtype=np.float32)), {}),
        (GREY, lambda: encode_image_record(np.full((8, 8), -np.inf)), {}),
        (GREY, lambda: encode_image_record(np.full(GREY, 1e39)), {}),  # beyond float32
    ],
}
CASES = [
    pytest.param(reason, shape, make, kwargs, id=f"{reason}-{i}")
    for reason, cases in REJECTIONS.items()
    for i, (shape, make, kwargs) in enumerate(cases)
]


@pytest.mark.parametrize(("reason", "shape", "make", "kwargs"), CASES)
def test_rejections(reason, shape, make, kwargs):
    result = rejected(decode(shape, make(), **kwargs), reason)
    assert result.detail


def test_every_reason_is_covered_and_documented():
    documented = {"oversize", "decode_error", "schema_mismatch", "bad_timestamp", "non_finite"}
    assert documented <= set(REASONS)
    assert set(REJECTIONS) == documented | set(IMAGE_REASONS)
    assert set(IMAGE_REASONS) == {"image_shape", "missing_key"}
    assert not set(IMAGE_REASONS) & set(REASONS)


def test_pickled_npy_is_refused_without_unpickling():
    UNPICKLED.clear()
    rejected(decode(GREY, _pickled_object_npy()), "decode_error")
    assert UNPICKLED == []
    # the payload really would run code if unpickled
    np.load(io.BytesIO(_pickled_object_npy()), allow_pickle=True)
    assert UNPICKLED


def test_shape_rejection_names_expected_and_got():
    result = rejected(
        decode(GREY, encode_image_record(np.ones(RGB, dtype=np.uint8), "png")), "image_shape"
    )
    assert "expected [1, 8, 8]" in result.detail and "got [3, 8, 8]" in result.detail


def test_shape_rejection_names_expected_and_got_for_npy_and_size():
    result = rejected(decode(GREY, encode_image_record(np.ones((8, 9)))), "image_shape")
    assert "[1, 8, 8]" in result.detail and "[8, 9]" in result.detail
    big = encode_image_record(np.ones((16, 12), dtype=np.uint8), "png")
    result = rejected(decode(GREY, big), "image_shape")
    assert "[1, 8, 8]" in result.detail and "[1, 16, 12]" in result.detail


def test_decoder_rejects_bad_settings():
    with pytest.raises(ValueError):
        ImageDecoder((8, 8), MAX_BYTES)
    with pytest.raises(ValueError):
        ImageDecoder((1, 0, 8), MAX_BYTES)
    with pytest.raises(ValueError):
        ImageDecoder(GREY, 0)


# -- error map ----------------------------------------------------------------------------------
def read_map(encoded: str) -> tuple[np.ndarray, int]:
    data = base64.b64decode(encoded, validate=True)
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG" and picture.mode == "L"
    return np.asarray(picture), len(data)


def test_error_map_png_small_map_keeps_size_and_peak(digits):
    errors = digits[4] ** 2 / 7.0
    pixels, _ = read_map(error_map_png(errors))
    assert pixels.shape == (8, 8)
    assert pixels.max() == 255
    assert np.unravel_index(pixels.argmax(), pixels.shape) == np.unravel_index(
        errors.argmax(), errors.shape
    )
    np.testing.assert_array_equal(pixels, np.rint(errors / errors.max() * 255).astype(np.uint8))


def test_error_map_png_downscales_and_stays_small():
    rng = np.random.default_rng(2)
    errors = rng.random((3, 128, 96))  # [C, H, W] noise: the hardest case to compress
    errors[:, 64:72, 40:48] += 50.0
    encoded = error_map_png(errors)
    pixels, size = read_map(encoded)
    assert pixels.shape == (32, 24)
    assert pixels.max() == 255
    row, col = np.unravel_index(pixels.argmax(), pixels.shape)
    assert 16 <= row < 18 and 10 <= col < 12  # the hot block, a quarter the size
    assert size < 2048 and len(encoded) < 2048

    noise = rng.random((32, 32))
    pixels, size = read_map(error_map_png(noise))
    assert pixels.shape == (32, 32) and pixels.max() == 255
    assert size < 2048 and len(error_map_png(noise)) < 2048


def test_error_map_png_downscale_is_a_box_average():
    rng = np.random.default_rng(5)
    errors = rng.random((64, 48))
    pixels, _ = read_map(error_map_png(errors))
    boxes = errors.reshape(32, 2, 24, 2).mean(axis=(1, 3))
    expected = np.rint(boxes / boxes.max() * 255)
    assert pixels.shape == (32, 24)
    assert np.abs(pixels.astype(float) - expected).max() <= 1


def test_error_map_png_compresses_a_smooth_map():
    ramp = np.add.outer(np.arange(32.0), np.arange(32.0))
    _, size = read_map(error_map_png(ramp))
    assert size < 600


def test_error_map_png_zero_and_channel_average():
    pixels, _ = read_map(error_map_png(np.zeros((5, 7))))
    assert pixels.shape == (5, 7) and not pixels.any()
    per_channel = np.zeros((3, 4, 4))
    per_channel[2, 1, 3] = 9.0
    per_channel[0, 0, 0] = 4.5
    pixels, _ = read_map(error_map_png(per_channel))
    assert pixels[1, 3] == 255 and pixels[0, 0] == 128
    with pytest.raises(ValueError):
        error_map_png(np.zeros(5))


# -- top regions --------------------------------------------------------------------------------
def brute_force_regions(plane: np.ndarray, cell: int) -> list[dict]:
    blocks = []
    for r0 in range(0, plane.shape[0], cell):
        for c0 in range(0, plane.shape[1], cell):
            block = plane[r0 : r0 + cell, c0 : c0 + cell]
            blocks.append(
                {
                    "row": r0,
                    "col": c0,
                    "height": block.shape[0],
                    "width": block.shape[1],
                    "error": float(block.mean()),
                }
            )
    return sorted(blocks, key=lambda b: -b["error"])


def test_top_regions_finds_a_planted_block():
    rng = np.random.default_rng(3)
    errors = rng.random((16, 16)) * 0.1
    errors[8:12, 4:8] += 5.0
    errors[0:4, 12:16] += 2.0
    regions = top_regions(errors, k=2, cell=4)
    assert [(r["row"], r["col"], r["height"], r["width"]) for r in regions] == [
        (8, 4, 4, 4),
        (0, 12, 4, 4),
    ]
    assert regions[0]["error"] == pytest.approx(errors[8:12, 4:8].mean())
    assert isinstance(regions[0]["error"], float) and isinstance(regions[0]["row"], int)


@pytest.mark.parametrize(("shape", "cell"), [((10, 13), 4), ((3, 10, 13), 3), ((8, 8), 8)])
def test_top_regions_match_brute_force(shape, cell):
    rng = np.random.default_rng(4)
    errors = rng.random(shape)
    plane = errors.mean(axis=0) if errors.ndim == 3 else errors
    expected = brute_force_regions(plane, cell)
    got = top_regions(errors, k=len(expected) + 5, cell=cell)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert {k: v for k, v in mine.items() if k != "error"} == {
            k: v for k, v in theirs.items() if k != "error"
        }
        assert mine["error"] == pytest.approx(theirs["error"], rel=1e-12)
    assert top_regions(errors, k=0) == []


def test_top_regions_on_a_digit(digits):
    errors = digits[0]  # a zero: ink in the middle columns, blank margins
    best = top_regions(errors, k=1, cell=2)[0]
    assert best["error"] == max(r["error"] for r in brute_force_regions(errors, 2))


# -- encoding -----------------------------------------------------------------------------------
def test_encode_image_record_refuses_what_png_cannot_hold():
    with pytest.raises(ValueError):
        encode_image_record(np.full((8, 8), 300), "png")
    with pytest.raises(ValueError):
        encode_image_record(np.full((8, 8), 0.5), "png")
    with pytest.raises(ValueError):
        encode_image_record(np.zeros((5, 8, 8)), "png")
    with pytest.raises(ValueError):
        encode_image_record(np.zeros((8, 8)), "gif")
    assert encode_image_record(np.zeros((8, 8))).startswith(b"\x93NUMPY")


def test_epoch_seconds_in_the_envelope_or_header_are_refused_as_for_readings(digits):
    """A numeric time that reads as 1970-1973 in epoch ms is epoch seconds: refused as a
    reading's is (it stamped the image's events in 1970), while ISO text of those years is taken."""
    raw = encode_image_record(digits[0])
    seconds = RECORD_TS // 1000
    refused = rejected(decode(GREY, envelope(ts=seconds, image=b64(raw))), "bad_timestamp")
    assert "epoch seconds" in refused.detail
    for header in (str(seconds).encode(), f"{seconds}.5".encode()):
        refused = rejected(decode(GREY, raw, headers=[("aewatch.ts", header)]), "bad_timestamp")
        assert "aewatch.ts" in refused.detail and "epoch seconds" in refused.detail
    iso_1971 = "1971-06-01T00:00:00Z"
    assert accepted(decode(GREY, envelope(ts=iso_1971, image=b64(raw)))).ts_ms == 44_582_400_000
    header = [("aewatch.ts", iso_1971.encode())]
    assert accepted(decode(GREY, raw, headers=header)).ts_ms == 44_582_400_000


def test_a_dead_letters_detail_is_the_same_for_the_same_record():
    """PIL names the stream object it could not read, with its address: the detail differed
    from one run (and one decode) to the next."""
    junk = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    details = {rejected(decode(GREY, junk), "decode_error").detail for _ in range(3)}
    assert len(details) == 1 and "0x" not in details.pop()


def test_an_array_is_laid_out_as_aewatch_score_lays_out_a_stack_of_it():
    """An array that is both [C, H, W] and [H, W, C] (C = H = W) is read channels-last, as
    training and `score` read a stack of such arrays; one that fits only [H, W, C] is taken even
    when its first side equals the channel count (it was refused)."""
    from training.data.image_files import _to_nchw

    cube = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    got = accepted(decode((3, 3, 3), encode_image_record(cube))).image
    np.testing.assert_array_equal(got, _to_nchw(cube[None], "test")[0])
    tall = np.arange(72, dtype=np.float32).reshape(3, 8, 3)  # [H, W, C] for a (3, 3, 8) model
    got = accepted(decode((3, 3, 8), encode_image_record(tall))).image
    np.testing.assert_array_equal(got, tall.transpose(2, 0, 1))


def test_pyfunc_rows_are_read_as_the_worker_reads_an_array():
    """The served model reshaped each row to [C, H, W] whatever its layout: an [H, W, C] image
    was scored scrambled, a NaN pixel scored NaN, a wrong size raised numpy's ValueError."""
    from pipeline.detector import Detector, InputSpec, ModelConfig, Scaler
    from pipeline.detector.models import build_model
    from pipeline.errors import DataError
    from pipeline.modalities.image import ImageModality

    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, size=(4, *RGB)).astype(np.float32)
    config = ModelConfig(kind="undercomplete", backbone="dense", input_shape=RGB)
    spec = InputSpec("image", image_shape=RGB)
    scaler = Scaler.fit("standard", images.transpose(0, 2, 3, 1).reshape(-1, 3))
    detector = Detector(spec, scaler, config, build_model(config))
    modality = ImageModality(spec)
    expected = detector.score(images).scores

    def scores(rows) -> np.ndarray:
        return modality.score_rows(detector, pd.DataFrame({"image": rows}))["score"].to_numpy()

    for layout in (images, images.transpose(0, 2, 3, 1)):
        np.testing.assert_allclose(scores([image.tolist() for image in layout]), expected)
    np.testing.assert_allclose(scores([image.ravel().tolist() for image in images]), expected)
    nan = images[1].copy()
    nan[0, 2, 2] = np.nan
    with pytest.raises(DataError, match=r"row 1: 'image' holds NaN"):
        scores([images[0].tolist(), nan.tolist()])
    with pytest.raises(DataError, match=r"row 0: 'image' of shape \[3, 8, 7\]"):
        scores([images[0][:, :, :7].tolist()])


def test_a_folder_of_pictures_is_read_for_a_detector_as_the_worker_reads_each(tmp_path):
    """The worker conforms a record's picture to the model's channels (palette, grey+alpha and
    RGBA pictures); `score` read a folder by fixed rules and refused what the worker scores
    ("images are (4, 8, 8), detector expects (3, 8, 8)", "unsupported image mode LA")."""
    from pipeline.detector import Detector, InputSpec, ModelConfig, Scaler
    from pipeline.detector.models import build_model
    from training.data.for_detector import ALL, DataSource, load_for

    rng = np.random.default_rng(5)
    rgba = rng.integers(0, 256, size=(8, 8, 4), dtype=np.uint8)
    pictures = {
        "rgb": {3: Image.fromarray(rgba[..., :3], "RGB")},
        "rgba": {3: Image.fromarray(rgba, "RGBA")},
        "palette": {3: Image.fromarray(rgba[..., :3], "RGB").quantize(16)},
        "grey-alpha": {1: Image.fromarray(rgba[..., :2], "LA")},
    }
    for name, by_channels in pictures.items():
        for channels, picture in by_channels.items():
            shape = (channels, 8, 8)
            folder = tmp_path / name
            folder.mkdir()
            png = png_of(picture)
            (folder / "a.png").write_bytes(png)
            config = ModelConfig(kind="undercomplete", backbone="dense", input_shape=shape)
            scaler = Scaler.fit("standard", rng.uniform(0, 255, size=(64, channels)))
            spec = InputSpec("image", image_shape=shape)
            detector = Detector(spec, scaler, config, build_model(config))
            read = load_for(detector, DataSource(str(folder))).parts[ALL].images
            streamed = accepted(decode(shape, png)).image
            np.testing.assert_array_equal(read[0], streamed, err_msg=name)


def test_an_image_whose_decoding_raises_is_dead_lettered_and_the_rest_taken(monkeypatch):
    """Whatever the image decoder raises on one record (a Pillow error no rule foresaw, say),
    that record is refused as decode_error with the error, and the others are taken (it stopped
    the worker, which read the same record again after a restart)."""
    from types import SimpleNamespace

    from pipeline.detector import InputSpec
    from pipeline.modalities.image import ImageModality
    from pipeline.modalities.images import ImageDecoder
    from pipeline.modalities.windowing import ReadyWindows

    intake = ImageModality(InputSpec("image", image_shape=(1, 8, 8))).intake(1 << 20)
    good = encode_image_record(np.zeros((8, 8), np.float32))
    poison = encode_image_record(np.ones((8, 8), np.float32))
    decode = ImageDecoder.decode

    def failing(self, key, value, headers, timestamp_ms):
        if value == poison:
            raise Image.DecompressionBombError("no rule foresaw this picture")
        return decode(self, key, value, headers, timestamp_ms)

    monkeypatch.setattr(ImageDecoder, "decode", failing)
    records = [
        SimpleNamespace(key=b"cam", value=v, headers=[], timestamp=1_767_225_600_000 + i, offset=i)
        for i, v in enumerate([good, poison, good])
    ]
    pending, refused = ReadyWindows(), []
    intake.take_all([(("images", 0), records)], pending, lambda r, why: refused.append((r, why)))
    assert [(r.offset, why.reason) for r, why in refused] == [(1, "decode_error")]
    assert "DecompressionBombError" in refused[0][1].detail
    assert len(pending) == 2
