"""Decoding image records for an image detector (the summaries of its errors are in `image`).

Accepted record values (the model's input shape is (C, H, W)):

- Raw image bytes: a PNG or JPEG (recognised by its magic bytes) or a NumPy `.npy` array. The
  entity key is the Kafka message key (UTF-8). The timestamp is the `aewatch.ts` header (epoch
  milliseconds or ISO-8601; the last such header wins) when present, else the Kafka record
  timestamp.
- A JSON envelope `{"key": "cam-3", "ts": 1767225600000 | "2026-01-01T00:00:00Z",
  "image": "<standard base64 of PNG, JPEG or .npy bytes>"}`. `key` falls back to the Kafka
  message key and `ts` to the header, then to the record timestamp; a `key` that differs from a
  message key rejects the record, since records are partitioned by the message key.

Units: pixel values reach the model as they are, with no rescaling: a PNG or JPEG gives 0..255
(0..65535 for 16-bit greyscale PNG), a `.npy` gives whatever its array holds, so the model must
have been trained in the same units.

Layout: a 2-D array or greyscale picture [H, W] becomes [1, H, W]; an RGB/RGBA picture [H, W, C]
becomes [C, H, W]. Palette and greyscale-with-alpha pictures are converted to the model's
channel count (1: greyscale, 2: greyscale + alpha, 3: RGB, 4: RGBA); an RGBA picture loses its
alpha for a 3-channel model; a 1-bit picture becomes greyscale 0/255. Greyscale is never widened
to colour, nor colour narrowed to greyscale: those are a channel mismatch. A 3-D `.npy` is taken
as [C, H, W] when its first dimension equals C, else as [H, W, C] when its last one does. Arrays
must be numeric (bool, integer or float); object arrays are refused without being unpickled.

Rejections (`Rejection.reason`):

- `oversize`: the value is longer than `max_record_bytes`.
- `decode_error`: empty value (tombstone); not a PNG, JPEG, `.npy` or JSON envelope; a corrupt
  or truncated picture or array; invalid base64; a non-numeric or object `.npy`.
- `schema_mismatch`: a JSON envelope that is not an object, lacks a string `image`, has a `key`
  that is not a string, or whose `key` differs from the message key.
- `missing_key`: neither a JSON `key` nor a (UTF-8) message key.
- `bad_timestamp`: an unparseable `ts` or `aewatch.ts` header, or no timestamp at all.
- `image_shape`: wrong height, width or channel count; the detail names expected and got.
- `non_finite`: NaN, infinity, or a value beyond float32 range in a `.npy`.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from tokenize import TokenError  # numpy's .npy header parser raises it
from typing import NamedTuple

import numpy as np
import orjson
from PIL import Image

from pipeline.errors import one_line
from pipeline.modalities.readings import REASONS, Rejection
from pipeline.modalities.times import MS_RANGE, SECONDS, parse_timestamp_ms, seconds_like

__all__ = [
    "IMAGE_REASONS",
    "TIMESTAMP_HEADER",
    "DecodedImage",
    "ImageDecoder",
    "conform_mode",
    "encode_image_record",
    "image_axes",
]

TIMESTAMP_HEADER = "aewatch.ts"

_REJECTIONS = (
    "oversize",
    "decode_error",
    "schema_mismatch",
    "missing_key",
    "bad_timestamp",
    "image_shape",
    "non_finite",
)
# Reasons an image record can be rejected for beyond those of sensor readings.
IMAGE_REASONS = tuple(reason for reason in _REJECTIONS if reason not in REASONS)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NPY_MAGIC = b"\x93NUMPY"
_JSON_LEADING = b" \t\r\n"

_GREY_MODES = frozenset({"L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
_MODE_FOR_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_PICTURE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)
_TIMESTAMP_ERRORS = (ValueError, OverflowError, OSError)


class DecodedImage(NamedTuple):
    """An accepted image: entity key, timestamp (epoch ms), and pixels float32 [C, H, W]."""

    key: str
    ts_ms: int
    image: np.ndarray


# An object's repr in a decoder's message (`<_io.BytesIO object at 0x7f...>`): a new address
# each run, in a dead letter's detail.
_OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")


def _detail(exc: BaseException) -> str:
    """A decoder's message as a rejection's detail: one line, at most 200 characters, the same
    for the same record (object addresses left out)."""
    return one_line(_OBJECT_REPR.sub("", str(exc)) or type(exc).__name__, 200)


def image_axes(shape: tuple[int, ...], expected: tuple[int, int, int]) -> tuple[int, ...] | None:
    """How one image array of `shape` maps to the model's (C, H, W): the axes to transpose, or
    None. [H, W] for one channel, [C, H, W] or [H, W, C]; an array that is both (C = H = W) is
    read as training reads a stack of them: channels-last."""
    channels, height, width = expected
    if len(shape) == 2:
        return (0, 1) if channels == 1 and shape == (height, width) else None
    if shape == (height, width, channels):
        return (2, 0, 1)
    if shape == (channels, height, width):
        return (0, 1, 2)
    return None


def _header_timestamp(raw: bytes | None) -> tuple[int, bool]:
    """Epoch ms from an `aewatch.ts` header: digits (epoch ms) or an ISO-8601 string; and
    whether it was a number."""
    if raw is None:
        raise ValueError(f"header {TIMESTAMP_HEADER} has no value")
    text = raw.decode().strip()
    try:
        return parse_timestamp_ms(int(text)), True
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return parse_timestamp_ms(text), False
    return parse_timestamp_ms(number), True


class ImageDecoder:
    """Decodes Kafka records into images of the model's shape (C, H, W), or rejects them."""

    def __init__(self, shape: tuple[int, int, int], max_record_bytes: int) -> None:
        shape = tuple(int(n) for n in shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"an image shape is (C, H, W) with positive sizes, got {shape}")
        if max_record_bytes < 1:
            raise ValueError("max_record_bytes must be positive")
        self.shape: tuple[int, int, int] = shape
        self.max_record_bytes = max_record_bytes

    def decode(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]] | None,
        timestamp_ms: int,
    ) -> DecodedImage | Rejection:
        if not value:
            return Rejection("decode_error", "empty record (tombstone)")
        if len(value) > self.max_record_bytes:
            return Rejection("oversize", f"{len(value)} bytes > {self.max_record_bytes}")
        envelope_key = envelope_ts = None
        payload = value
        if value[:1] in b"{ \t\r\n" and value.lstrip(_JSON_LEADING)[:1] == b"{":
            opened = self._open_envelope(value)
            if isinstance(opened, Rejection):
                return opened
            envelope_key, envelope_ts, payload = opened
        entity = self._entity_key(key, envelope_key)
        if isinstance(entity, Rejection):
            return entity
        ts_ms = self._timestamp(envelope_ts, headers, timestamp_ms)
        if isinstance(ts_ms, Rejection):
            return ts_ms
        image = self._pixels(payload)
        if isinstance(image, Rejection):
            return image
        return DecodedImage(entity, ts_ms, image)

    # -- record fields ---------------------------------------------------------------------------
    @staticmethod
    def _open_envelope(value: bytes) -> tuple[object, object, bytes] | Rejection:
        try:
            data = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return Rejection("decode_error", _detail(exc))
        if not isinstance(data, dict):
            return Rejection("schema_mismatch", "not a JSON object")
        encoded = data.get("image")
        if encoded is None:
            return Rejection("schema_mismatch", "a JSON envelope needs 'image'")
        if not isinstance(encoded, str):
            return Rejection("schema_mismatch", "'image' must be a base64 string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            return Rejection("decode_error", f"'image' is not valid base64: {_detail(exc)}")
        if not payload:
            return Rejection("decode_error", "'image' is empty")
        return data.get("key"), data.get("ts"), payload

    @staticmethod
    def _entity_key(message_key: bytes | None, envelope_key: object) -> str | Rejection:
        if envelope_key is not None and envelope_key != "":
            if not isinstance(envelope_key, str | int) or isinstance(envelope_key, bool):
                return Rejection("schema_mismatch", "'key' must be a string")
            entity = str(envelope_key)
            if message_key and message_key != entity.encode():
                return Rejection("schema_mismatch", "JSON 'key' differs from the message key")
            return entity
        if not message_key:
            return Rejection("missing_key", "no entity key (JSON 'key' or message key)")
        try:
            return message_key.decode()
        except UnicodeDecodeError:
            return Rejection("missing_key", "message key is not UTF-8")

    @staticmethod
    def _timestamp(
        envelope_ts: object, headers: list[tuple[str, bytes]] | None, timestamp_ms: int | None
    ) -> int | Rejection:
        if envelope_ts is not None:
            try:
                ms = parse_timestamp_ms(envelope_ts)
            except _TIMESTAMP_ERRORS as exc:
                return Rejection("bad_timestamp", f"'ts': {_detail(exc)}")
            if envelope_ts.__class__ is not str and seconds_like(ms):
                return Rejection(*SECONDS)
            return ms
        header = None
        found = False
        for name, raw in headers or ():
            if name == TIMESTAMP_HEADER:
                header, found = raw, True
        if found:
            try:
                ms, numeric = _header_timestamp(header)
            except _TIMESTAMP_ERRORS as exc:
                return Rejection("bad_timestamp", f"header {TIMESTAMP_HEADER}: {_detail(exc)}")
            if numeric and seconds_like(ms):
                return Rejection("bad_timestamp", f"header {TIMESTAMP_HEADER}: {SECONDS[1]}")
            return ms
        if timestamp_ms is None or isinstance(timestamp_ms, bool) or timestamp_ms < 0:
            return Rejection("bad_timestamp", "no 'ts', no header and no record timestamp")
        if timestamp_ms >= MS_RANGE[1]:
            return Rejection("bad_timestamp", "the record timestamp is beyond the year 9999")
        return int(timestamp_ms)

    # -- pixels ----------------------------------------------------------------------------------
    def _pixels(self, payload: bytes) -> np.ndarray | Rejection:
        if payload.startswith(_NPY_MAGIC):
            array = self._read_npy(payload)
        elif payload.startswith(_PNG_MAGIC):
            array = self._read_picture(payload, "PNG")
        elif payload.startswith(_JPEG_MAGIC):
            array = self._read_picture(payload, "JPEG")
        else:
            return Rejection("decode_error", "not a PNG, JPEG, .npy or JSON envelope")
        if isinstance(array, Rejection):
            return array
        if array.dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                image = np.ascontiguousarray(array, dtype=np.float32)
            if not np.isfinite(image).all():
                return Rejection("non_finite", "image holds NaN, infinity or out-of-range values")
            return image
        return np.ascontiguousarray(array, dtype=np.float32)

    def _shape_error(self, got: tuple[int, ...]) -> Rejection:
        return Rejection("image_shape", f"expected {list(self.shape)}, got {list(got)}")

    def _read_npy(self, payload: bytes) -> np.ndarray | Rejection:
        stream = io.BytesIO(payload)
        fmt = np.lib.format
        try:
            version = fmt.read_magic(stream)
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(stream)
            elif version == (2, 0):
                shape, _, dtype = fmt.read_array_header_2_0(stream)
            else:
                return Rejection("decode_error", f".npy format version {version} not accepted")
        except (ValueError, SyntaxError, EOFError, TypeError, TokenError) as exc:
            return Rejection("decode_error", f"bad .npy header: {_detail(exc)}")
        if dtype.hasobject:
            return Rejection("decode_error", ".npy object arrays (pickled data) are not accepted")
        if dtype.kind not in "biuf":
            return Rejection("decode_error", f".npy dtype {dtype} is not numeric")
        axes = image_axes(tuple(shape), self.shape)
        if axes is None:
            return self._shape_error(tuple(shape))
        needed = stream.tell() + int(np.prod(shape)) * dtype.itemsize
        if len(payload) < needed:
            return Rejection("decode_error", f".npy truncated: {len(payload)} of {needed} bytes")
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError, TypeError) as exc:
            return Rejection("decode_error", f"unreadable .npy: {_detail(exc)}")
        if array.ndim == 2:
            return array[np.newaxis]
        return array.transpose(axes)

    def _read_picture(self, payload: bytes, fmt: str) -> np.ndarray | Rejection:
        channels, height, width = self.shape
        try:
            picture = Image.open(io.BytesIO(payload), formats=(fmt,))
        except Image.DecompressionBombError as exc:
            return Rejection("image_shape", f"expected {list(self.shape)}: {_detail(exc)}")
        except _PICTURE_ERRORS as exc:
            return Rejection("decode_error", f"unreadable {fmt}: {_detail(exc)}")
        with picture:
            got_width, got_height = picture.size  # read from the header, before any pixels
            if (got_height, got_width) != (height, width):
                return self._shape_error((len(picture.getbands()), got_height, got_width))
            try:
                array = np.asarray(conform_mode(picture, channels))
            except _PICTURE_ERRORS as exc:
                return Rejection("decode_error", f"unreadable {fmt}: {_detail(exc)}")
        array = array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)
        if array.shape[0] != channels:
            return self._shape_error(array.shape)
        return array


def conform_mode(picture: Image.Image, channels: int) -> Image.Image:
    """Convert palette, bilevel and alpha pictures to the model's channel count where that is
    a change of representation rather than of content; others are left for the shape check."""
    mode = picture.mode
    if mode in _GREY_MODES or mode == "RGB":
        return picture
    if mode == "1":
        return picture.convert("L")
    if mode in ("P", "PA", "LA"):
        target = _MODE_FOR_CHANNELS.get(channels)
        if target is None:
            target = "LA" if mode == "LA" else "RGBA"
        return picture if target == mode else picture.convert(target)
    if mode == "RGBA":
        return picture.convert("RGB") if channels == 3 else picture
    return picture.convert("RGB")  # CMYK, YCbCr and other colour modes


# -- encoding (simulators and tests) ------------------------------------------------------------
def encode_image_record(image: np.ndarray, fmt: str = "npy") -> bytes:
    """Record bytes for an image: `npy` keeps the array as is (no pickle); `png` and `jpeg` take
    [H, W] or [C, H, W] (C of 1-4 for PNG, 1 or 3 for JPEG) with integer values in 0..255."""
    array = np.asarray(image)
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    if fmt not in ("png", "jpeg"):
        raise ValueError(f"unknown image format {fmt!r}; use npy, png or jpeg")
    if array.ndim == 3:
        allowed = (1, 2, 3, 4) if fmt == "png" else (1, 3)
        if array.shape[0] not in allowed:
            raise ValueError(f"{fmt} takes {allowed} channels, got {array.shape[0]}")
        array = array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)
    elif array.ndim != 2:
        raise ValueError(f"expected [H, W] or [C, H, W], got {array.shape}")
    if array.dtype != np.uint8:
        numbers = array.astype(np.float64)
        if not (
            np.isfinite(numbers).all()
            and (numbers >= 0).all()
            and (numbers <= 255).all()
            and (numbers == np.rint(numbers)).all()
        ):
            raise ValueError(f"{fmt} pixels must be integers in 0..255")
        array = numbers.astype(np.uint8)
    picture = Image.fromarray(np.ascontiguousarray(array))
    if fmt == "png":
        picture.save(buffer, format="PNG")
    else:
        picture.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()
