"""Token files: the triplanes of a video's clips, serialised as safetensors, .npz or JSON.

Every format carries the three planes with a leading clip axis, `xy [K, Rxy, Rxy, C]`,
`yt [K, Rt, Rxy, C]`, `xt [K, Rt, Rxy, C]`, and metadata (`TokenMetadata`: model id, weights hash,
frames per clip, valid frames of each clip, source fps and size, ...): in the safetensors header
(strings, values that are lists or objects JSON-encoded, as safetensors requires), as a
`__metadata__` JSON string entry of the .npz, or as a `metadata` object in JSON. In the .npz and
JSON files values are typed JSON (`"n_frames": [41]`, `"fps": 25`); files that hold them as
JSON-encoded strings (`"n_frames": "[41]"`, as older servers wrote) read the same.

The same tokens give the same bytes in every format and process.

Nothing from the network reaches the model unchecked: `parse` bounds the declared sizes before
anything is allocated or decompressed (every .npz member's declared and decompressed size, the
JSON value count, the safetensors header), and checks the format, dtypes, shapes against the
serving model, finiteness and (when the file names one) the model's identity. Every failure is a
`TokenError` whose message says what was expected. Metadata is checked where it is used
(`TokenMetadata.clip_layout`, `frame_rate`, `source_geometry`): a file whose unused entries are odd
still decodes.
"""
from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from coordtok.formats.geometry import Geometry
from coordtok.formats.video import FALLBACK_FPS, MAX_FPS, MIN_FPS
from coordtok.model.clips import ClipLayout
from coordtok.model.config import CoordTokConfig
from coordtok.model.triplane import PLANES, Triplane

FORMATS = {
    "safetensors": "application/vnd.coordtok.tokens+safetensors",
    "npz": "application/x-npz",
    "json": "application/json",
}
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_NPZ_METADATA = "__metadata__"
_MAX_METADATA_BYTES = 1 << 20  # the safetensors header, the .npz metadata member, JSON metadata
_MAX_NPZ_MEMBERS = 16  # a token .npz holds 4
_NPY_HEADER_BYTES = 1 << 16  # room for an .npy header in a member's size bound
_NPZ_COMPRESSIONS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}  # numpy.savez, savez_compressed
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class TokenError(ValueError):
    """A token file that cannot be used with the serving model."""


@dataclass(frozen=True)
class Resize:
    """How source frames were mapped to the model's frame size (the metadata's 'geometry'): the
    `Geometry` fields that do not depend on the frame sizes. Boxes are (top, left, height, width)."""

    policy: str
    scaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    pad: tuple[int, int, int, int]

    @classmethod
    def of(cls, geometry: Geometry) -> Resize:
        return cls(geometry.policy, geometry.scaled, geometry.crop, geometry.pad)


@dataclass(frozen=True, eq=False)
class TokenMetadata(Mapping[str, str]):
    """What a token file says about its clips, as typed values; None where it does not say.

    model_id, weights_sha256: the model that made the tokens (`name@hash`) and its weights' sha256.
    frames_per_clip: the model's clip length T. n_frames: the source frames each clip holds;
    clip_starts: each clip's first source frame; clip_policy: how clips lie in the video
    (model/clips.py). source_fps: the source's rate (0: unknown); fps: the rate its frames were
    read at (a decode's default). source_size: the source frames' (height, width); geometry: how
    they were resized to the model's. extra: other entries (a generated file's seed, sampler, ...),
    as stored. unreadable: entries of the fields above whose value is not of the field's type, as
    stored: the file still round-trips, and the check that needs such an entry refuses it.

    It also reads as the str -> str mapping a safetensors header stores (lists and objects
    JSON-encoded, rates to 6 significant digits), `metadata["n_frames"] == "[8, 8]"`, and two
    metadata are equal when they store the same.
    """

    model_id: str | None = None
    weights_sha256: str | None = None
    frames_per_clip: int | None = None
    n_frames: tuple[int, ...] | None = None
    clip_starts: tuple[int, ...] | None = None
    clip_policy: str | None = None
    source_fps: float | None = None
    fps: float | None = None
    source_size: tuple[int, int] | None = None
    geometry: Resize | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    unreadable: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.extra) & set(_CODECS) or set(self.unreadable) - set(_CODECS):
            raise ValueError(f"extra entries are those not among {sorted(_CODECS)}, unreadable ones among them")

    @classmethod
    def read(cls, entries: Mapping) -> TokenMetadata:
        """A file's metadata (plain JSON values, or the JSON-encoded strings of safetensors and
        older files) -> TokenMetadata. Never fails: an entry of the wrong type is `unreadable`."""
        typed, extra, unreadable = {}, {}, {}
        for key, value in entries.items():
            key = str(key)
            if key not in _CODECS:
                extra[key] = _text(value)
                continue
            try:
                typed[key] = _CODECS[key].read(value)
            except (TypeError, ValueError, OverflowError, RecursionError):
                unreadable[key] = _text(value)
        return cls(**typed, extra=extra, unreadable=unreadable)

    @cached_property
    def stored(self) -> dict[str, str]:
        """The entries as strings, sorted by key (what a safetensors header holds)."""
        entries = {**self.extra, **self.unreadable}
        for key, codec in _CODECS.items():
            if (value := getattr(self, key)) is not None:
                entries[key] = codec.write(value)
        return dict(sorted(entries.items()))

    def plain(self) -> dict:
        """The entries as JSON values, sorted by key (what .npz and JSON files hold): text fields
        as strings, other fields by their type, other entries as the JSON value their text
        encodes exactly, if any ("8" -> 8; "12e45" stays a string)."""
        return {key: text if _CODECS.get(key) is _TEXT else _plain_value(text) for key, text in self.stored.items()}

    def __getitem__(self, key: str) -> str:
        return self.stored[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def clip_layout(self, clips: int, frames_per_clip: int) -> ClipLayout:
        """Where the `clips` clips lie in their video (model/clips.py) for a model of
        `frames_per_clip` frames: 'n_frames' (every clip whole when absent), 'clip_starts'
        (default: consecutive, by the running sum of 'n_frames') and 'clip_policy' (default "pad",
        what servers wrote before the policy was recorded). TokenError when they describe no
        such layout."""
        if {"n_frames", "clip_starts"} & set(self.unreadable):
            raise TokenError("metadata 'n_frames' and 'clip_starts' must be JSON lists of frame counts")
        lengths = self.n_frames or (frames_per_clip,) * clips
        starts = self.clip_starts if self.clip_starts is not None else tuple(sum(lengths[:k]) for k in range(len(lengths)))
        if len(lengths) != clips or len(starts) != clips:
            raise TokenError(f"metadata 'n_frames' and 'clip_starts' must list {clips} values, one per clip")
        try:
            return ClipLayout(starts, lengths, frames_per_clip, self.clip_policy or "pad")
        except ValueError as error:
            raise TokenError(f"metadata describes an impossible clip layout: {error}") from None

    def frame_rate(self) -> float:
        """The rate the frames were read at ('fps'), FALLBACK_FPS when absent; TokenError when it
        is no frame rate from MIN_FPS to MAX_FPS."""
        if "fps" in self.unreadable or (self.fps is not None and not MIN_FPS <= self.fps <= MAX_FPS):
            raise TokenError(f"metadata 'fps' must be a frame rate from {MIN_FPS:g} to {MAX_FPS:g}, "
                             f"got {self['fps'][:20]!r}")
        return FALLBACK_FPS if self.fps is None else self.fps

    def source_geometry(self, output: tuple[int, int]) -> Geometry | None:
        """How the source frames became the model's `output` (height, width) frames, from
        'source_size' and 'geometry'; None when either is absent or unreadable."""
        if self.source_size is None or self.geometry is None:
            return None
        g = self.geometry
        return Geometry(g.policy, self.source_size, g.scaled, output, g.crop, g.pad)


class _Codec(NamedTuple):
    """How a field of TokenMetadata is read from a file's value and written as stored text."""

    read: Callable[[object], object]
    write: Callable[[object], str]


def _text(value) -> str:
    """A file's value as stored text: a string as it is, another JSON value JSON-encoded."""
    return value if isinstance(value, str) else json.dumps(value)


def _decoded(value):
    """A file's value: JSON-encoded in a string (safetensors, older files), else plain JSON."""
    return json.loads(value) if isinstance(value, str) else value


def _count(value) -> int:
    if type(value := _decoded(value)) is not int:
        raise ValueError("expected an integer")
    return value


def _counts(value, n: int | None = None) -> tuple[int, ...]:
    """A list of integers (`n` of them when given) as a tuple."""
    value = _decoded(value)
    if not isinstance(value, list) or not all(type(v) is int for v in value) or (n is not None and len(value) != n):
        raise ValueError(f"expected a list of {n or 'some'} integers")
    return tuple(value)


def _rate(value) -> float:
    """A finite number; a string as Python reads a float ("25", "29.97": what servers wrote)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or not math.isfinite(rate := float(value)):
        raise ValueError("expected a finite number")
    return rate


def _resize(value) -> Resize:
    value = _decoded(value)
    if not isinstance(value, dict) or set(value) != {"policy", "scaled", "crop", "pad"} or not isinstance(value["policy"], str):
        raise ValueError("expected an object of policy, scaled, crop and pad")
    return Resize(value["policy"], _counts(value["scaled"], 2), _counts(value["crop"], 4), _counts(value["pad"], 4))


def _list_text(values: tuple) -> str:
    return json.dumps(list(values))


def _resize_text(g: Resize) -> str:
    return json.dumps({"policy": g.policy, "scaled": list(g.scaled), "crop": list(g.crop), "pad": list(g.pad)})


_TEXT = _Codec(_text, str)
_RATE = _Codec(_rate, lambda rate: f"{rate:g}")
_CODECS = {
    "model_id": _TEXT, "weights_sha256": _TEXT, "clip_policy": _TEXT,
    "frames_per_clip": _Codec(_count, str),
    "n_frames": _Codec(_counts, _list_text), "clip_starts": _Codec(_counts, _list_text),
    "source_fps": _RATE, "fps": _RATE,
    "source_size": _Codec(lambda value: _counts(value, 2), _list_text),
    "geometry": _Codec(_resize, _resize_text),
}


@dataclass
class Tokens:
    """The triplanes of K clips (a Triplane whose batch axis is the clip axis) and metadata.

    `metadata` may be given as a mapping of a file's entries (str -> str as safetensors stores
    them, or plain JSON values); it is read into a TokenMetadata."""

    triplane: Triplane
    metadata: TokenMetadata = field(default_factory=TokenMetadata)

    def __setattr__(self, name: str, value) -> None:
        if name == "metadata" and not isinstance(value, TokenMetadata):
            value = TokenMetadata.read(value)
        super().__setattr__(name, value)

    @property
    def clips(self) -> int:
        return self.triplane.batch_size


def plane_shapes(config: CoordTokConfig) -> dict[str, tuple[int, int, int]]:
    """Per plane, the shape of one clip's plane: (R0, R1, C)."""
    xy, t, c = config.latent_res_xy, config.latent_res_t, config.latent_channels
    return {"xy": (xy, xy, c), "yt": (t, xy, c), "xt": (t, xy, c)}


def largest_file_bytes(config: CoordTokConfig, max_clips: int) -> int:
    """An upper bound on the size of a token file `parse` can accept for `config`: `max_clips`
    clips in the largest format (JSON: 21 bytes per value as `serialise` writes it, 45 indented
    by 4 spaces; 48 allowed) plus 1 MiB of header and metadata. Bodies past it are refused before
    they are read."""
    values = sum(a * b * c for a, b, c in plane_shapes(config).values())
    return max_clips * values * 48 + (1 << 20)


def serialise(tokens: Tokens, fmt: str) -> bytes:
    """Tokens -> bytes in `fmt` (safetensors, npz or json); planes are written as float32."""
    planes = {name: plane.detach().float().cpu().contiguous() for name, plane in zip(PLANES, tokens.triplane.planes())}
    if fmt == "safetensors":
        return _write_safetensors(planes, tokens.metadata.stored)
    plain = tokens.metadata.plain()
    if fmt == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, **{k: v.numpy() for k, v in planes.items()}, **{_NPZ_METADATA: np.array(json.dumps(plain))})
        return buffer.getvalue()
    if fmt == "json":
        return json.dumps({"metadata": plain, **{k: v.tolist() for k, v in planes.items()}}).encode()
    raise ValueError(f"unknown token format {fmt!r}; choose one of {sorted(FORMATS)}")


def _write_safetensors(planes: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file of float32 `planes` whose header lists its keys in a fixed order (the
    library's writer orders the metadata by a per-process hash, so its bytes varied)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    data, offset = [], 0
    for name, plane in sorted(planes.items()):
        raw = plane.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(plane.shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    return struct.pack("<Q", len(text)) + text + b"".join(data)


def _plain_value(text: str):
    """A metadata string as the JSON value it encodes ("[41]" -> [41], "8" -> 8), when it encodes
    one exactly (the value reads back as the same string); other strings stay strings."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if not isinstance(value, str) and json.dumps(value) == text else text


def _metadata(metadata, what: str) -> TokenMetadata:
    if not isinstance(metadata, dict):
        raise TokenError(f"{what} must be a JSON object")
    return TokenMetadata.read(metadata)


def parse(data: bytes, fmt: str, config: CoordTokConfig | None, max_clips: int, model_id: str | None = None) -> Tokens:
    """Bytes of a token file -> validated Tokens on CPU (float32).

    `config` fixes the planes' shapes (None accepts any, for clients reading a server's answer);
    `max_clips` bounds K before any tensor is allocated; `model_id`, when given, must equal the
    file's `model_id` metadata if the file has one.
    """
    if fmt not in FORMATS:
        raise TokenError(f"unknown token format {fmt!r}; send one of {sorted(FORMATS)}")
    expected = plane_shapes(config) if config is not None else {}
    planes, metadata = {"safetensors": _read_safetensors, "npz": _read_npz, "json": _read_json}[fmt](
        data, expected, max_clips
    )
    clips = {plane.shape[0] for plane in planes.values()}
    if len(clips) != 1:
        raise TokenError(f"the planes hold different numbers of clips: { {k: v.shape[0] for k, v in planes.items()} }")
    for name, plane in planes.items():
        if not bool(torch.isfinite(plane).all()):
            raise TokenError(f"plane {name!r} holds NaN or Inf values")
    if model_id is not None and metadata.model_id not in (None, model_id):
        raise TokenError(f"these tokens were made by model {metadata.model_id!r}; this server serves {model_id!r}")
    return Tokens(Triplane(*(planes[name] for name in PLANES)), metadata)


def _check_declared(name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, int, int]], max_clips: int) -> None:
    """Check a plane's declared shape [K, R0, R1, C] before its data is read."""
    if name not in expected:
        return
    want = expected[name]
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise TokenError(f"plane {name!r} has shape {list(shape)}; this model expects [clips, {', '.join(map(str, want))}]")
    if not 1 <= shape[0] <= max_clips:
        raise TokenError(f"plane {name!r} holds {shape[0]} clips; between 1 and {max_clips} are accepted")


def _require_planes(found: set[str]) -> None:
    missing = [name for name in PLANES if name not in found]
    if missing:
        raise TokenError(f"the token file lacks the planes {missing}; it must hold {list(PLANES)}")


def _read_safetensors(data: bytes, expected, max_clips) -> tuple[dict[str, torch.Tensor], TokenMetadata]:
    if len(data) < 8:
        raise TokenError("not a safetensors file: shorter than its 8-byte header length")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > min(len(data) - 8, _MAX_METADATA_BYTES):
        raise TokenError("not a safetensors file: its header length is out of range (truncated or another format)")
    header = _json(data[8 : 8 + header_length], "the safetensors header")
    if not isinstance(header, dict):
        raise TokenError("not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(entry, dict) for entry in header.values()):
        raise TokenError("not a safetensors file: its header is not an object of tensor entries and string metadata")
    _require_planes(set(header))
    for name, entry in header.items():
        if name in expected and entry.get("dtype") not in _FLOAT_DTYPES:
            raise TokenError(f"plane {name!r} has dtype {entry.get('dtype')}; send F32, F16 or BF16")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            raise TokenError(f"tensor {name!r}: its shape must be a list of integers, got {str(shape)[:40]}")
        _check_declared(name, tuple(shape), expected, max_clips)
    try:
        tensors = load_safetensors(data)
    except Exception as error:  # the library raises its own error types for malformed files
        raise TokenError(f"the safetensors file is malformed: {error}") from None
    return {name: tensors[name].float() for name in PLANES}, TokenMetadata.read(metadata)


def _check_zip_directory(data: bytes) -> None:
    """Refuse an archive whose central directory lists more members than a token file has
    before zipfile reads it (zipfile builds an object per listed member)."""
    end = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 0xFFFF))
    if end < 0 or end + 22 > len(data):
        raise TokenError("not a valid .npz token file: it has no zip end-of-directory record (truncated?)")
    (members,) = struct.unpack("<H", data[end + 10 : end + 12])
    zip64 = end >= 20 and data[end - 20 : end - 16] == b"PK\x06\x07"
    if members > _MAX_NPZ_MEMBERS or zip64:
        raise TokenError(f"the .npz lists {'a zip64 directory of' if zip64 else members} members; a token file holds "
                         f"{len(PLANES) + 1} (the planes and {_NPZ_METADATA}); save it with numpy.savez")


def _read_npy(archive: zipfile.ZipFile, info: zipfile.ZipInfo, max_bytes: int, check_header) -> np.ndarray:
    """One .npy member, refused before it is read when it is compressed with another method than
    numpy writes or declares more than `max_bytes`, and read no further than that (a member
    that inflates past its declared size is refused); `check_header(shape, dtype)` sees the .npy
    header before the data is read."""
    name = info.filename
    if info.compress_type not in _NPZ_COMPRESSIONS:
        raise TokenError(f"member {name!r} is compressed with zip method {info.compress_type}; token files are "
                         f"stored or deflated ({', '.join(_NPZ_COMPRESSIONS.values())}: numpy.savez or savez_compressed)")
    if info.file_size > max_bytes:
        raise TokenError(f"member {name!r} declares {info.file_size} bytes; at most {max_bytes} are accepted for it")
    with archive.open(info) as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise TokenError(f"member {name!r} inflates past {max_bytes} bytes")
    buffer = io.BytesIO(raw)
    read_header = _NPY_HEADERS.get(np.lib.format.read_magic(buffer))
    if read_header is None:
        raise TokenError(f"member {name!r}: unsupported .npy format version; save with numpy.savez")
    shape, _, dtype = read_header(buffer)
    check_header(shape, dtype)
    buffer.seek(0)
    return np.lib.format.read_array(buffer, allow_pickle=False)


def _read_npz(data: bytes, expected, max_clips) -> tuple[dict[str, torch.Tensor], TokenMetadata]:
    _check_zip_directory(data)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        _require_planes(set(members))
        planes = {}
        for name in PLANES:
            # float64 at most; without a config (a client reading an answer) the body bounds it.
            values = max_clips * math.prod(expected[name]) if name in expected else len(data)
            planes[name] = torch.from_numpy(_read_npy(
                archive, members[name], 8 * values + _NPY_HEADER_BYTES, lambda shape, dtype, name=name:
                _check_plane_header(name, shape, dtype, expected, max_clips)).astype(np.float32))
        metadata = {}
        if _NPZ_METADATA in members:
            text = _read_npy(archive, members[_NPZ_METADATA], 4 * _MAX_METADATA_BYTES + _NPY_HEADER_BYTES, _check_metadata_header)
            metadata = _json(str(text), "the .npz metadata")
    except TokenError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, NotImplementedError) as error:
        raise TokenError(f"not a valid .npz token file: {error}") from None
    return planes, _metadata(metadata, "the .npz metadata")


def _check_plane_header(name: str, shape: tuple[int, ...], dtype: np.dtype, expected, max_clips: int) -> None:
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise TokenError(f"plane {name!r} has dtype {dtype}; send float16, float32 or float64")
    _check_declared(name, shape, expected, max_clips)


def _check_metadata_header(shape: tuple[int, ...], dtype: np.dtype) -> None:
    if shape != () or dtype.kind != "U":
        raise TokenError(f"the .npz metadata must be one string (a 0-d str array), got {dtype} of shape {list(shape)}")


def _json(text: bytes | str, what: str):
    """json.loads, with every failure (nesting too deep included) a TokenError about `what`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise TokenError(f"{what} is not valid JSON: {str(error)[:200]}") from None


def _read_json(data: bytes, expected, max_clips) -> tuple[dict[str, torch.Tensor], TokenMetadata]:
    if expected:  # every value but the last is followed by a comma: bound the values before parsing
        values = max_clips * sum(math.prod(shape) for shape in expected.values()) + _MAX_METADATA_BYTES // 8
        if data.count(b",") > values:
            raise TokenError(f"the JSON token file holds more than {values} values; {max_clips} clips of this "
                             "model need fewer")
    document = _json(data, "the JSON token file")
    if not isinstance(document, dict):
        raise TokenError('a JSON token file is an object {"xy": [...], "yt": [...], "xt": [...], "metadata": {...}}')
    _require_planes(set(document))
    planes = {}
    for name in PLANES:
        try:
            array = np.asarray(document[name], dtype=np.float32)
        except (TypeError, ValueError):
            raise TokenError(f"plane {name!r} is not a nested list of numbers of one shape") from None
        _check_declared(name, array.shape, expected, max_clips)
        planes[name] = torch.from_numpy(array)
    return planes, _metadata(document.get("metadata") or {}, "metadata")
