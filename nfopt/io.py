"""Checkpoint files: tensors plus JSON metadata in safetensors format, and the learned rule in them.

A checkpoint is a plain safetensors file, written and read by the ``safetensors`` package, so any
safetensors reader opens one and loading never unpickles anything (unlike ``torch.save`` files).
Its ``__metadata__`` holds ``"format_version"`` (a decimal integer) and ``"nfopt"`` (the caller's
metadata as one JSON string). Every problem with a file is raised as a :class:`CheckpointError`
that names the file and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from .optim.rule import LearnedUpdate

__all__ = ["FORMAT_VERSION", "RULE_CONTENT", "CheckpointError", "load_checkpoint", "load_rule",
           "read_metadata", "save_checkpoint", "save_rule"]

FORMAT_VERSION: int = 2
"""Version of the metadata layout written by :func:`save_checkpoint`; readers accept 1..this.
Version 2 names a rule checkpoint's content under ``"content"`` (version 1: ``"kind"``), so an
nfopt that reads only version 1 says "upgrade" instead of "not a learned-update checkpoint"."""

RULE_CONTENT = "nfopt.LearnedUpdate"
"""What a rule checkpoint holds, under the metadata key ``"content"`` (``"kind"`` in older files)."""

StrPath = str | os.PathLike[str]

_HINTS = {
    "header too small": "file truncated, or not a checkpoint",
    "invalid header length": "file truncated, or not a safetensors file",
    "incomplete metadata": "file truncated, or bytes appended after the tensor data",
    "header too large": "corrupt, or not a safetensors file",
}
"""What safetensors errors, matched by their wording, mean for a checkpoint where they do not say."""


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


def save_checkpoint(path: StrPath, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Write ``tensors`` (in their own dtypes) and JSON-serialisable ``metadata`` to ``path`` atomically.

    ``metadata`` goes through JSON, so it comes back with lists for tuples and string keys. The
    file is written under a temporary name in the same directory, synced and renamed over
    ``path``, so an interrupted save leaves the old file or the new one, never a partial one.
    Raises ``TypeError``/``ValueError`` for inputs that cannot be stored, before any file is
    created, and ``OSError`` when the file cannot be written.
    """
    if not isinstance(tensors, Mapping) or not isinstance(metadata, Mapping):
        raise TypeError(f"tensors and metadata must be mappings, not {type(tensors)} and {type(metadata)}")
    for name, tensor in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}: use a string other than '__metadata__'")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TypeError(f"tensor {name!r} is not a dense torch.Tensor")
    try:
        nfopt = json.dumps(dict(metadata), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    # Fresh copies, as safetensors refuses non-contiguous tensors and tensors sharing memory.
    copies = {k: t.detach().to("cpu", copy=True, memory_format=torch.contiguous_format) for k, t in tensors.items()}
    try:
        data = safetensors.torch.save(copies, {"format_version": str(FORMAT_VERSION), "nfopt": nfopt})
    except (KeyError, ValueError, RuntimeError) as e:  # KeyError: a dtype safetensors cannot hold
        raise TypeError(f"tensors cannot be stored in a checkpoint ({type(e).__name__}: {e})") from e

    directory, name = os.path.split(os.path.abspath(path))
    tmp_path = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    # Mode 0o666 lets the umask pick the permissions, as a plain open() would.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_path)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename durable; only POSIX systems open directories
        with contextlib.suppress(OSError):  # some file systems refuse; the file is synced already
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def load_checkpoint(path: StrPath, map_location: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint written by :func:`save_checkpoint` (or any safetensors writer).

    Returns the tensors on ``map_location``, each in memory of its own, and the metadata dict.
    Raises :class:`CheckpointError` for every problem with the file.
    """
    tensors = {}
    with _open(path) as (f, metadata):
        for name in f.keys():
            tensor = f.get_tensor(name)
            if tensor.dtype == torch.bool and tensor.numel() and int(tensor.view(torch.uint8).max()) > 1:
                raise CheckpointError(path, f"tensor {name!r} of dtype BOOL holds bytes other than 0 and 1")
            # get_tensor's tensors map the file: rewritten in place, it would crash them on access.
            tensors[name] = tensor.clone()
    return {name: tensor.to(map_location) for name, tensor in tensors.items()}, metadata


def read_metadata(path: StrPath) -> dict[str, Any]:
    """A checkpoint's metadata, without reading its tensors: the file's layout is still checked."""
    with _open(path) as (_, metadata):
        return metadata


@contextlib.contextmanager
def _open(path: StrPath) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Open ``path`` with safetensors, as ``(handle, metadata)``; every failure, the library's
    included, leaves as a :class:`CheckpointError` naming the file."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(path, "no such file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise CheckpointError(path, f"cannot be opened ({getattr(e, 'strerror', None) or e})") from e
    if stat.S_ISDIR(mode):
        raise CheckpointError(path, "is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise CheckpointError(path, "is not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            yield f, _decode_metadata(f.metadata(), path)
    except CheckpointError:
        raise
    except SafetensorError as e:
        raise CheckpointError(path, _explain(path, str(e))) from e
    except (OSError, ValueError, TypeError, RuntimeError) as e:  # whatever else the library raises
        raise CheckpointError(path, f"cannot be read ({type(e).__name__}: {e})") from e


def _explain(path: str, message: str) -> str:
    """A safetensors error message with what it means, and whether the file is a torch.save one."""
    hint = next((f"; {h}" for key, h in _HINTS.items() if key in message), "")
    reason = f"not a valid safetensors file ({message}{hint})"
    magic = b""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        magic = f.read(4)
    # A zip archive (torch.save's format) or a pickle of protocol 2 to 5 (its legacy format).
    if magic == b"PK\x03\x04" or (len(magic) > 1 and magic[0] == 0x80 and 2 <= magic[1] <= 5):
        reason += "; it looks like a torch.save file, which is not supported: loading one unpickles it"
    return reason


def _decode_metadata(raw: dict[str, str] | None, path: str) -> dict[str, Any]:
    """Check the format version and decode the nfopt metadata in ``__metadata__``."""
    if raw is None:
        raise CheckpointError(path, "no '__metadata__' entry; not an nfopt checkpoint (plain safetensors file?)")
    for key in ("format_version", "nfopt"):
        if key not in raw:
            raise CheckpointError(path, f"'__metadata__' has no {key!r} entry; not an nfopt checkpoint")
    version = raw["format_version"]
    if not (version.isascii() and version.isdigit() and int(version) >= 1):
        raise CheckpointError(path, f"unsupported format_version {version!r} (supported: 1 to {FORMAT_VERSION})")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(path, f"written by a newer nfopt (format_version {version}; this nfopt reads up "
                                    f"to {FORMAT_VERSION}); upgrade nfopt to load it")
    try:
        metadata = json.loads(raw["nfopt"])
    except ValueError as e:
        raise CheckpointError(path, f"metadata entry 'nfopt' is not valid JSON ({e})") from e
    if not isinstance(metadata, dict):
        raise CheckpointError(path, f"metadata entry 'nfopt' is a JSON {type(metadata).__name__}, not an object")
    return metadata


def save_rule(rule: LearnedUpdate, path: StrPath, provenance: Mapping[str, Any] | None = None) -> None:
    """Write ``rule`` as a checkpoint: its weights, the config that rebuilds it and ``provenance``."""
    metadata = {"content": RULE_CONTENT, "config": rule.config.to_dict(), "provenance": dict(provenance or {})}
    save_checkpoint(path, rule.state_dict(), metadata)


def load_rule(path: StrPath, map_location: str | torch.device = "cpu") -> LearnedUpdate:
    """The rule in a checkpoint written by :func:`save_rule`, with its provenance.

    Raises :class:`CheckpointError` naming the file when it holds no rule, its config cannot be
    read, or its tensors do not fit the config (names, shapes, floating dtype, finite values).
    """
    from .optim.rule import LearnedUpdate, UpdateConfig  # not at the top: nfopt.optim imports this module

    tensors, metadata = load_checkpoint(path, map_location=map_location)
    content = metadata.get("content", metadata.get("kind"))  # "kind": written before the rename
    if content != RULE_CONTENT:
        raise CheckpointError(path, f"not a learned-update checkpoint (content {content!r})")
    try:
        rule = LearnedUpdate(UpdateConfig(**metadata["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(path, f"its config cannot be read: {e}") from e
    expected = rule.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(path, f"tensors do not match its config (missing {missing}, unexpected {extra})")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape or not got.is_floating_point():
            raise CheckpointError(path, f"tensor {name} has shape {tuple(got.shape)} and dtype {got.dtype}, "
                                        f"its config needs shape {tuple(want.shape)} floating point")
        if not torch.isfinite(got).all():
            raise CheckpointError(path, f"tensor {name} holds non-finite values")
    rule.load_state_dict({name: tensors[name].to(want.dtype) for name, want in expected.items()})
    rule.provenance = metadata.get("provenance", {})
    return rule
