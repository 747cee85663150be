"""Token files: the triplanes of a video's clips, serialised as safetensors, .npz or JSON.

Every format carries the three planes with a leading clip axis, `xy [K, Rxy, Rxy, C]`,
`yt [K, Rt, Rxy, C]`, `xt [K, Rt, Rxy, C]`, and metadata (model id, weights hash, frames per clip,
valid frames of each clip, source fps and size, ...): in the safetensors header (strings, values
that are lists or objects JSON-encoded, as safetensors requires), as a `__metadata__` JSON string
entry of the .npz, or as a `metadata` object in JSON. In the .npz and JSON files values are plain
JSON (`"n_frames": [41]`); files that hold them as JSON-encoded strings (`"n_frames": "[41]"`, as
older servers wrote) read the same. In Python, `Tokens.metadata` holds strings, as in safetensors.

The same tokens give the same bytes in every format and process.

Nothing from the network reaches the model unchecked: `parse` bounds the declared sizes before
anything is allocated or decompressed (every .npz member's declared and decompressed size, the
JSON value count, the safetensors header), and checks the format, dtypes, shapes against the
serving model, finiteness and (when the file names one) the model's identity. Every failure is a
`TokenError` whose message says what was expected.
"""
from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

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
    """A token file that cannot be used with the serving model (HTTP 422)."""


@dataclass
class Tokens:
    """The triplanes of K clips (a Triplane whose batch axis is the clip axis) and metadata."""

    triplane: Triplane
    metadata: dict[str, str] = field(default_factory=dict)

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
    metadata = dict(sorted(tokens.metadata.items()))
    if fmt == "safetensors":
        return _write_safetensors(planes, metadata)
    plain = {key: _plain_value(value) for key, value in metadata.items()}
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


def _metadata_strings(metadata: dict, what: str) -> dict[str, str]:
    """Metadata as read from a file -> strings: plain JSON values JSON-encoded, strings kept."""
    if not isinstance(metadata, dict):
        raise TokenError(f"{what} must be a JSON object")
    return {str(key): value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


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
    if model_id is not None and metadata.get("model_id", model_id) != model_id:
        raise TokenError(f"these tokens were made by model {metadata['model_id']!r}; this server serves {model_id!r}")
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


def _read_safetensors(data: bytes, expected, max_clips) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    return {name: tensors[name].float() for name in PLANES}, {str(k): str(v) for k, v in metadata.items()}


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


def _read_npz(data: bytes, expected, max_clips) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    return planes, _metadata_strings(metadata, "the .npz metadata")


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


def _read_json(data: bytes, expected, max_clips) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    return planes, _metadata_strings(document.get("metadata") or {}, "metadata")
