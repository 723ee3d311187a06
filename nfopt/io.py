"""Checkpoint files: a meta-trained network's tensors plus JSON metadata, in safetensors format.

A checkpoint is a plain safetensors file, so any safetensors reader can open one and nothing in
it can execute code when loaded (unlike ``torch.save`` files, which are pickles). The layout is

* 8 bytes: little-endian unsigned length ``N`` of the header;
* ``N`` bytes: a UTF-8 JSON object. Its ``"__metadata__"`` entry maps strings to strings; ours
  holds ``"format_version"`` (a decimal integer) and ``"nfopt"`` (the caller's metadata as one
  JSON string). Every other entry describes a tensor:
  ``{"dtype": "F32", "shape": [3, 4], "data_offsets": [begin, end]}``;
* the tensors' raw little-endian bytes, the offsets counting from the end of the header.

Both directions are written here with ``json``, ``struct`` and ``torch`` alone, so the package
needs no safetensors dependency. Reading validates the whole layout before touching tensor data
and reports every defect as a :class:`CheckpointError` that names the file and the defect.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "read_metadata",
]

FORMAT_VERSION: int = 1
"""Version of the metadata layout written by :func:`save_checkpoint`; readers accept 1..this."""

StrPath = str | os.PathLike[str]
"""A file path as the os module accepts it."""

_METADATA_KEY = "__metadata__"
_VERSION_KEY = "format_version"
_NFOPT_KEY = "nfopt"
_LENGTH_FIELD = struct.Struct("<Q")
_MAX_HEADER_BYTES = 100_000_000
"""Same limit as the reference safetensors reader: a larger header means a corrupt file."""

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
"""Files are little-endian; on a big-endian host every element's bytes are reversed in transit."""


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, or from an incompatible nfopt.

    ``path`` is the file and ``reason`` says what is wrong with it; ``str()`` joins the two.
    """

    def __init__(self, path: StrPath, reason: str) -> None:
        super().__init__(os.fspath(path), reason)
        self.path = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class _Entry:
    """One tensor's description from the header; offsets count from the start of the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    """A validated header: the caller's metadata and the tensors sorted by position in the file."""

    metadata: dict[str, Any]
    entries: list[_Entry]
    data_start: int


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    path: StrPath, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Write ``tensors`` and JSON-serialisable ``metadata`` to ``path`` atomically.

    Tensors are stored contiguous, on CPU, in their own dtype (one of the safetensors dtypes
    F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL). ``metadata`` goes through JSON, so it
    comes back with lists for tuples and string keys. The file is written to a temporary name
    in the same directory, flushed to disk and then renamed over ``path``, so an interrupted save
    leaves either the old file or the new one, never a partial one.

    Raises ``TypeError``/``ValueError`` for inputs that cannot be stored (before any file is
    created) and ``OSError`` when the file cannot be written.
    """
    path = os.fspath(path)
    payloads = _tensor_payloads(tensors)
    header = _encode_header(payloads, metadata)

    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    # os.open with mode 0o666 lets the umask pick the permissions, as a plain open() would.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(header)
            for _, data in payloads:
                f.write(data.numpy())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    _fsync_directory(directory)


def _tensor_payloads(tensors: Mapping[str, torch.Tensor]) -> list[tuple[_Entry, torch.Tensor]]:
    """Each tensor's header entry and file bytes, laid out like the reference writer does.

    Larger elements come first, so with the header padded to 8 bytes every tensor starts at a
    multiple of its element size; ties are ordered by name so equal inputs give equal files.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of names to tensors, not {type(tensors).__name__}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == _METADATA_KEY:
            raise ValueError(f"invalid tensor name {name!r}: use a string other than {_METADATA_KEY!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TypeError(f"tensor {name!r} is not a dense torch.Tensor")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which checkpoints cannot hold")

    payloads = []
    offset = 0
    for name in sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n)):
        tensor = tensors[name].detach().to("cpu").contiguous()
        data = _convert_byte_order(tensor.reshape(-1).view(torch.uint8), tensor.dtype.itemsize)
        entry = _Entry(name, tensor.dtype, tuple(tensor.shape), offset, offset + data.numel())
        payloads.append((entry, data))
        offset = entry.end
    return payloads


def _encode_header(
    payloads: list[tuple[_Entry, torch.Tensor]], metadata: Mapping[str, Any]
) -> bytes:
    """The length field and JSON header, padded with spaces to a multiple of 8 bytes."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    try:
        metadata_json = json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata is not JSON-serialisable: {e}") from e

    header: dict[str, Any] = {
        _METADATA_KEY: {_VERSION_KEY: str(FORMAT_VERSION), _NFOPT_KEY: metadata_json}
    }
    for entry, _ in payloads:
        header[entry.name] = {
            "dtype": _DTYPE_NAMES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return _LENGTH_FIELD.pack(len(encoded)) + encoded


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable, where the system allows it.

    Only POSIX systems can open a directory, and some file systems refuse to sync one; the
    file's own contents are synced and in place by then, so those cases are not errors.
    """
    if not hasattr(os, "O_DIRECTORY"):
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _convert_byte_order(data: torch.Tensor, itemsize: int) -> torch.Tensor:
    """Convert flat element bytes between the file's little-endian order and the host's.

    The conversion is its own inverse, so writing and reading share it.
    """
    if _LITTLE_ENDIAN_HOST or itemsize == 1:
        return data
    return data.reshape(-1, itemsize).flip(1).reshape(-1)


# ----------------------------------------------------------------------------- reading


def load_checkpoint(
    path: StrPath, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any safetensors writer).

    Returns the tensors, each owning its memory, on ``map_location``, and the metadata dict.
    The header and the file's layout are validated in full before any tensor data is read;
    nothing is ever unpickled. Raises :class:`CheckpointError` for every problem with the file.
    """
    path = os.fspath(path)
    device = torch.device(map_location)
    with _open(path) as f:
        header = _read_header(f, path)
        tensors = {}
        for entry in header.entries:
            f.seek(header.data_start + entry.begin)
            tensors[entry.name] = _read_tensor(f, path, entry).to(device)
    return tensors, header.metadata


def read_metadata(path: StrPath) -> dict[str, Any]:
    """The metadata of a checkpoint, reading and validating only its header.

    Cheap even for large files; raises :class:`CheckpointError` for the same header and layout
    problems as :func:`load_checkpoint`.
    """
    path = os.fspath(path)
    with _open(path) as f:
        return _read_header(f, path).metadata


def _open(path: str) -> BinaryIO:
    """Open a regular file for reading, turning every failure into a :class:`CheckpointError`."""
    try:
        f = open(path, "rb")
    except OSError as e:
        if os.path.isdir(path):
            reason = "is a directory, not a checkpoint file"
        elif isinstance(e, FileNotFoundError):
            reason = "no such file"
        else:
            reason = f"cannot be opened ({e.strerror or e})"
        raise CheckpointError(path, reason) from e
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise CheckpointError(path, "is not a regular file")
    return f


def _read_header(f: BinaryIO, path: str) -> _Header:
    """Read, parse and validate the header and the file layout it describes."""
    file_size = os.fstat(f.fileno()).st_size
    if file_size == 0:
        raise CheckpointError(path, "file is empty")
    prefix = f.read(_LENGTH_FIELD.size)
    if len(prefix) < _LENGTH_FIELD.size:
        raise CheckpointError(
            path,
            f"file is only {len(prefix)} bytes, shorter than the 8-byte header length field "
            "(truncated, or not a checkpoint)",
        )
    (header_len,) = _LENGTH_FIELD.unpack(prefix)
    if header_len > _MAX_HEADER_BYTES:
        raise CheckpointError(
            path,
            f"header length {header_len} is over the {_MAX_HEADER_BYTES}-byte limit "
            f"(corrupt, truncated, or not a safetensors file){_foreign_format_hint(prefix)}",
        )
    if header_len > file_size - _LENGTH_FIELD.size:
        raise CheckpointError(
            path,
            f"header length {header_len} exceeds the {file_size - _LENGTH_FIELD.size} bytes that "
            f"follow it (file truncated, or not a safetensors file){_foreign_format_hint(prefix)}",
        )

    try:
        text = f.read(header_len).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(path, f"header is not valid UTF-8 ({e})") from e
    raw = _parse_json_object(text, path, "header")

    metadata = _parse_metadata(raw.pop(_METADATA_KEY, None), path)
    entries = sorted(
        (_parse_entry(name, spec, path) for name, spec in raw.items()), key=lambda e: (e.begin, e.end)
    )
    data_start = _LENGTH_FIELD.size + header_len
    _check_layout(entries, file_size - data_start, path)
    return _Header(metadata, entries, data_start)


def _foreign_format_hint(prefix: bytes) -> str:
    """Explain a bad header length when the file starts like a ``torch.save`` output."""
    if prefix.startswith(b"PK\x03\x04") or prefix.startswith(b"\x80"):
        return (
            "; it looks like a torch.save/pickle file, but nfopt checkpoints are safetensors "
            "files and are never unpickled"
        )
    return ""


def _parse_json_object(text: str, path: str, what: str) -> dict[str, Any]:
    """Parse ``text`` as a JSON object whose keys are all distinct."""
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except ValueError as e:
        raise CheckpointError(path, f"{what} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(path, f"{what} is a JSON {type(value).__name__}, not a JSON object")
    return value


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook: a repeated key would silently hide one of its values."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_metadata(raw: Any, path: str) -> dict[str, Any]:
    """Check the format version and decode the nfopt metadata from ``__metadata__``."""
    if raw is None:
        raise CheckpointError(
            path,
            f"header has no {_METADATA_KEY!r} entry; not an nfopt checkpoint (plain safetensors file?)",
        )
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise CheckpointError(path, f"{_METADATA_KEY!r} is not a JSON object of strings")
    for key in (_VERSION_KEY, _NFOPT_KEY):
        if key not in raw:
            raise CheckpointError(
                path, f"{_METADATA_KEY!r} has no {key!r} entry; not an nfopt checkpoint"
            )

    version_text = raw[_VERSION_KEY]
    if not (version_text.isascii() and version_text.isdigit()):
        raise CheckpointError(path, f"format_version {version_text!r} is not a non-negative integer")
    version = int(version_text)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            path,
            f"written by a newer nfopt (format_version {version}; this nfopt reads up to "
            f"{FORMAT_VERSION}); upgrade nfopt to load it",
        )
    if version < 1:
        raise CheckpointError(
            path, f"unsupported format_version {version} (supported: 1 to {FORMAT_VERSION})"
        )
    return _parse_json_object(raw[_NFOPT_KEY], path, f"metadata entry {_NFOPT_KEY!r}")


def _parse_entry(name: str, spec: Any, path: str) -> _Entry:
    """Validate one tensor's header entry on its own: dtype, shape, and offsets matching both."""

    def fail(reason: str) -> CheckpointError:
        return CheckpointError(path, f"tensor {name!r}: {reason}")

    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise fail("entry must be an object with exactly the keys dtype, shape and data_offsets")
    dtype = _DTYPES.get(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    if dtype is None:
        raise fail(f"unknown dtype {spec['dtype']!r} (known: {', '.join(_DTYPES)})")
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise fail(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise fail(f"data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise fail(
            f"data_offsets {offsets} span {end - begin} bytes, but shape {shape} of "
            f"{spec['dtype']} needs {expected}"
        )
    return _Entry(name, dtype, tuple(shape), begin, end)


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (JSON ``true`` parses as a Python int, so exclude bools)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(entries: list[_Entry], data_size: int, path: str) -> None:
    """The tensors, sorted by offset, must tile the data buffer exactly: no gap, overlap or excess."""
    position = 0
    previous = None
    for entry in entries:
        if entry.begin < position:
            raise CheckpointError(
                path, f"tensors {previous!r} and {entry.name!r} overlap in the data buffer"
            )
        if entry.begin > position:
            raise CheckpointError(
                path, f"bytes {position} to {entry.begin} of the data buffer belong to no tensor"
            )
        position, previous = entry.end, entry.name
    if position > data_size:
        raise CheckpointError(
            path,
            f"file truncated: the tensor data needs {position} bytes "
            f"but only {data_size} follow the header",
        )
    if position < data_size:
        raise CheckpointError(path, f"{data_size - position} unexpected bytes after the tensor data")


def _read_tensor(f: BinaryIO, path: str, entry: _Entry) -> torch.Tensor:
    """Read one tensor's bytes from the current position into freshly allocated memory."""
    data = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    if f.readinto(data.numpy()) != data.numel():
        raise CheckpointError(path, f"file truncated while reading tensor {entry.name!r}")
    if entry.dtype == torch.bool and data.numel() and int(data.max()) > 1:
        raise CheckpointError(
            path, f"tensor {entry.name!r} of dtype BOOL holds bytes other than 0 and 1"
        )
    return _convert_byte_order(data, entry.dtype.itemsize).view(entry.dtype).reshape(entry.shape)
