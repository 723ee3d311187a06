"""Checkpoint files: round trips, safetensors interoperability, corruption, atomicity, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch

from nfopt import io
from nfopt.io import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)

METADATA = {
    "features": ["grad", "momentum", "adam"],
    "nfn": {"hidden": 32, "layers": 2, "eps": 1e-8},
    "meta_training": {"tasks": [{"name": "digits_mlp", "steps": 300}], "seed": 0},
    "note": "unicode ok: \u00e9\u2713",
}


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "bf16": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 1]),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
    }


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


@pytest.fixture
def ckpt(tmp_path) -> str:
    path = str(tmp_path / "model.nfopt")
    save_checkpoint(path, sample_tensors(), METADATA)
    return path


def write_raw(path, header: dict, data: bytes = b"") -> None:
    """A safetensors-layout file with an arbitrary header, for building corrupt checkpoints."""
    encoded = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)


def nfopt_header(version: str = str(FORMAT_VERSION), **tensors) -> dict:
    return {"__metadata__": {"format_version": version, "nfopt": json.dumps(METADATA)}, **tensors}


def entry(dtype: str, shape: list, offsets: list) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def assert_error(excinfo: pytest.ExceptionInfo, path, *reason_parts: str) -> None:
    message = str(excinfo.value)
    assert os.fspath(path) in message
    for part in reason_parts:
        assert part in message, message


# ----------------------------------------------------------------------------- round trips


def test_round_trip_preserves_dtypes_shapes_values_and_metadata(ckpt):
    tensors, metadata = load_checkpoint(ckpt)
    assert_same(tensors, sample_tensors())
    assert metadata == METADATA
    assert read_metadata(ckpt) == METADATA


def test_saves_only_the_visible_elements_of_views(tmp_path):
    base = torch.arange(1000.0).reshape(100, 10)
    view = base[2:4].t()  # non-contiguous view of a much larger storage
    path = tmp_path / "v.nfopt"
    save_checkpoint(path, {"v": view}, {})
    assert os.path.getsize(path) < 400
    tensors, _ = load_checkpoint(path)
    assert torch.equal(tensors["v"], view)
    assert tensors["v"].is_contiguous()


def test_tensors_requiring_grad_are_saved_as_data(tmp_path):
    param = torch.nn.Parameter(torch.ones(2, 2))
    path = tmp_path / "p.nfopt"
    save_checkpoint(path, {"p": param}, {})
    loaded = load_checkpoint(path)[0]["p"]
    assert not loaded.requires_grad and torch.equal(loaded, torch.ones(2, 2))


def test_loaded_tensors_own_exactly_their_memory(ckpt):
    tensors, _ = load_checkpoint(ckpt)
    os.remove(ckpt)
    pointers = set()
    for name, tensor in tensors.items():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), name
        pointers.add(tensor.untyped_storage().data_ptr())
    assert len(pointers) == len(tensors)
    tensors["f32"].add_(1.0)  # writable
    assert torch.equal(tensors["f32"], sample_tensors()["f32"] + 1.0)


def test_map_location_moves_tensors(ckpt):
    tensors, _ = load_checkpoint(ckpt, map_location=torch.device("meta"))
    assert all(t.device.type == "meta" for t in tensors.values())
    assert tensors["bf16"].dtype == torch.bfloat16 and tensors["bf16"].shape == (2, 3)


def test_equal_inputs_give_identical_files(tmp_path):
    a, b = tmp_path / "a.nfopt", tmp_path / "b.nfopt"
    save_checkpoint(a, sample_tensors(), METADATA)
    save_checkpoint(b, dict(reversed(sample_tensors().items())), dict(reversed(METADATA.items())))
    assert a.read_bytes() == b.read_bytes()


def test_tensor_data_is_aligned_and_little_endian(tmp_path):
    path = tmp_path / "a.nfopt"
    save_checkpoint(path, {"a": torch.tensor([1], dtype=torch.int8), "b": torch.tensor([1.0])}, {})
    raw = path.read_bytes()
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    assert data_start % 8 == 0
    assert raw[data_start:] == struct.pack("<f", 1.0) + b"\x01"  # wider element first


def test_big_endian_hosts_swap_bytes_symmetrically(tmp_path, monkeypatch):
    little, big = tmp_path / "little.nfopt", tmp_path / "big.nfopt"
    tensors = sample_tensors()
    save_checkpoint(little, tensors, {})
    monkeypatch.setattr(io, "_LITTLE_ENDIAN_HOST", False)
    save_checkpoint(big, tensors, {})
    # The in-memory bytes here are little-endian, so "converting" them for a big-endian host
    # makes the file differ; reading under the same assumption must undo it exactly.
    assert little.read_bytes() != big.read_bytes()
    assert_same(load_checkpoint(big)[0], tensors)
    f64 = load_checkpoint(little)[0]["f64"]
    assert not torch.equal(f64, tensors["f64"])


@pytest.mark.parametrize(
    "tensors, metadata, error",
    [
        ({"x": torch.zeros(2, dtype=torch.complex64)}, {}, TypeError),
        ({"x": torch.zeros(2).to_sparse()}, {}, TypeError),
        ({"x": [1.0, 2.0]}, {}, TypeError),
        ({"__metadata__": torch.zeros(1)}, {}, ValueError),
        ({"x": torch.zeros(1)}, {"bad": object()}, TypeError),
        ({"x": torch.zeros(1)}, {"nan": float("nan")}, TypeError),
        ({"x": torch.zeros(1)}, ["not", "a", "mapping"], TypeError),
    ],
)
def test_unstorable_inputs_are_rejected_before_touching_disk(tmp_path, tensors, metadata, error):
    with pytest.raises(error):
        save_checkpoint(tmp_path / "x.nfopt", tensors, metadata)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- interoperability


def test_reference_reader_loads_our_files(ckpt):
    safetensors = pytest.importorskip("safetensors")
    st_torch = pytest.importorskip("safetensors.torch")
    assert_same(st_torch.load_file(ckpt), sample_tensors())
    with safetensors.safe_open(ckpt, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["nfopt"]) == METADATA


def test_we_load_files_from_the_reference_writer(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "ref.safetensors"
    tensors = sample_tensors()
    st_torch.save_file(
        tensors, str(path), metadata={"format_version": "1", "nfopt": json.dumps(METADATA)}
    )
    loaded, metadata = load_checkpoint(path)
    assert_same(loaded, tensors)
    assert metadata == METADATA


def test_plain_safetensors_file_is_not_an_nfopt_checkpoint(tmp_path):
    st_torch = pytest.importorskip("safetensors.torch")
    path = tmp_path / "plain.safetensors"
    st_torch.save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_error(excinfo, path, "__metadata__", "not an nfopt checkpoint")


# ----------------------------------------------------------------------------- bad files

READERS = [load_checkpoint, read_metadata]


@pytest.mark.parametrize("reader", READERS)
def test_truncation_anywhere_is_detected(ckpt, tmp_path, reader):
    raw = open(ckpt, "rb").read()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    cuts = [3, 8, 20, header_end - 1, header_end, header_end + 5, len(raw) - 1]
    for cut in cuts:
        path = tmp_path / f"cut{cut}.nfopt"
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError) as excinfo:
            reader(path)
        assert_error(excinfo, path, "truncated")


@pytest.mark.parametrize("reader", READERS)
def test_trailing_bytes_are_detected(ckpt, reader):
    with open(ckpt, "ab") as f:
        f.write(b"\0" * 3)
    with pytest.raises(CheckpointError) as excinfo:
        reader(ckpt)
    assert_error(excinfo, ckpt, "3 unexpected bytes after the tensor data")


BAD_HEADERS = {
    "no metadata": ({"w": entry("U8", [2], [0, 2])}, "no '__metadata__'"),
    "metadata not strings": (
        {"__metadata__": {"format_version": 1, "nfopt": "{}"}},
        "not a JSON object of strings",
    ),
    "missing version": ({"__metadata__": {"nfopt": "{}"}}, "no 'format_version'"),
    "missing nfopt": ({"__metadata__": {"format_version": "1"}}, "no 'nfopt'"),
    "non-integer version": (nfopt_header(version="one"), "format_version 'one' is not"),
    "version zero": (nfopt_header(version="0"), "unsupported format_version 0"),
    "future version": (nfopt_header(version=str(FORMAT_VERSION + 1)), "newer nfopt"),
    "nfopt not JSON": (
        {"__metadata__": {"format_version": "1", "nfopt": "{oops"}},
        "'nfopt' is not valid JSON",
    ),
    "nfopt not object": (
        {"__metadata__": {"format_version": "1", "nfopt": "[1]"}},
        "JSON list, not a JSON object",
    ),
    "unknown dtype": (nfopt_header(w=entry("F8", [1], [0, 1])), "unknown dtype 'F8'"),
    "offsets vs shape": (
        nfopt_header(w=entry("F32", [2, 3], [0, 20])),
        "span 20 bytes, but shape [2, 3] of F32 needs 24",
    ),
    "negative dim": (nfopt_header(w=entry("F32", [-1], [0, 0])), "non-negative"),
    "bool dim": (nfopt_header(w=entry("U8", [True], [0, 1])), "non-negative"),
    "bad offsets": (nfopt_header(w=entry("U8", [1], [0])), "not a pair"),
    "missing key": (nfopt_header(w={"dtype": "U8", "shape": [1]}), "exactly the keys"),
    "overlap": (
        nfopt_header(a=entry("U8", [4], [0, 4]), b=entry("U8", [4], [2, 6])),
        "'a' and 'b' overlap",
    ),
    "gap": (
        nfopt_header(a=entry("U8", [2], [0, 2]), b=entry("U8", [2], [4, 6])),
        "bytes 2 to 4 of the data buffer belong to no tensor",
    ),
    "offset past end": (
        nfopt_header(w=entry("U8", [4], [0, 4])),
        "truncated: the tensor data needs 4 bytes but only 2",
    ),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_are_reported_with_reason(tmp_path, case, reader):
    header, reason = BAD_HEADERS[case]
    path = tmp_path / "bad.nfopt"
    write_raw(path, header, data=b"\0\0")
    with pytest.raises(CheckpointError) as excinfo:
        reader(path)
    assert_error(excinfo, path, reason)


def length_prefixed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


BAD_BYTES = {
    "garbage header": (length_prefixed(b"\xff\xfe garbage \x80"), "header is not valid UTF-8"),
    "non-JSON header": (length_prefixed(b"{not json}"), "header is not valid JSON"),
    "header not an object": (length_prefixed(b"[1, 2]"), "header is a JSON list, not a JSON object"),
    "duplicate key": (
        length_prefixed(b'{"__metadata__": {"format_version": "1", "nfopt": "{}"}, "__metadata__": {}}'),
        "duplicate key '__metadata__'",
    ),
    "header longer than file": (
        struct.pack("<Q", 1000) + b"{}",
        "header length 1000 exceeds the 2 bytes",
    ),
    "absurd header length": (struct.pack("<Q", 2**40) + b"{}", "over the 100000000-byte limit"),
    "shorter than length field": (b"\x02\x00\x00", "only 3 bytes"),
    "empty file": (b"", "file is empty"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_malformed_bytes_are_reported_with_reason(tmp_path, case, reader):
    content, reason = BAD_BYTES[case]
    path = tmp_path / "bad.nfopt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        reader(path)
    assert_error(excinfo, path, reason)


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_torch_save_files_are_refused_without_unpickling(tmp_path, monkeypatch, zipfile_format):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=zipfile_format)
    forbid_unpickling(monkeypatch)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_error(excinfo, path, "torch.save/pickle file", "never unpickled")


def test_invalid_bool_bytes_are_detected(tmp_path):
    path = tmp_path / "bool.nfopt"
    write_raw(path, nfopt_header(b=entry("BOOL", [2], [0, 2])), b"\x01\x07")
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_error(excinfo, path, "'b' of dtype BOOL holds bytes other than 0 and 1")


@pytest.mark.parametrize("reader", READERS)
def test_missing_file_directory_and_device_are_reported(tmp_path, reader):
    cases = [(tmp_path / "absent.nfopt", "no such file"), (tmp_path, "is a directory")]
    if os.path.exists("/dev/null"):
        cases.append(("/dev/null", "not a regular file"))
    for path, reason in cases:
        with pytest.raises(CheckpointError) as excinfo:
            reader(path)
        assert_error(excinfo, path, reason)


def test_checkpoint_error_carries_path_and_reason_and_pickles(tmp_path):
    path = tmp_path / "absent.nfopt"
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    error = excinfo.value
    assert isinstance(error, ValueError)
    assert (error.path, error.reason) == (str(path), "no such file")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error) == f"{path}: no such file"


# ----------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_leaves_old_file_and_no_temporary(ckpt, tmp_path, monkeypatch, failing):
    before = open(ckpt, "rb").read()

    def fail(*args, **kwargs):
        raise OSError("simulated failure")

    monkeypatch.setattr(os, failing, fail)
    with pytest.raises(OSError, match="simulated failure"):
        save_checkpoint(ckpt, {"other": torch.zeros(10)}, {"new": True})
    monkeypatch.undo()
    assert open(ckpt, "rb").read() == before
    assert os.listdir(tmp_path) == [os.path.basename(ckpt)]
    assert load_checkpoint(ckpt)[1] == METADATA


def test_interrupted_tensor_write_leaves_old_file_and_no_temporary(ckpt, tmp_path, monkeypatch):
    before = open(ckpt, "rb").read()
    real_numpy = torch.Tensor.numpy
    written = []

    class Interrupted(Exception):
        pass

    def numpy_then_interrupt(self, *args, **kwargs):
        # The writer hands each tensor's bytes to the file through .numpy(); the second one fails,
        # after the header and the first tensor have gone into the temporary file.
        if written:
            raise Interrupted
        written.append(self)
        return real_numpy(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", numpy_then_interrupt)
    with pytest.raises(Interrupted):
        save_checkpoint(ckpt, sample_tensors(), {"new": True})
    monkeypatch.undo()
    assert len(written) == 1
    assert open(ckpt, "rb").read() == before
    assert os.listdir(tmp_path) == [os.path.basename(ckpt)]


def test_successful_overwrite_leaves_only_the_new_file(ckpt, tmp_path):
    save_checkpoint(ckpt, {"x": torch.arange(4)}, {"v": 2})
    assert os.listdir(tmp_path) == [os.path.basename(ckpt)]
    tensors, metadata = load_checkpoint(ckpt)
    assert torch.equal(tensors["x"], torch.arange(4)) and metadata == {"v": 2}


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_file_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "m.nfopt", {}, {})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "m.nfopt").st_mode & 0o777 == 0o640


# ----------------------------------------------------------------------------- no unpickling


def forbid_unpickling(monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loading must never unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)


def test_loading_never_unpickles(ckpt, monkeypatch):
    forbid_unpickling(monkeypatch)
    tensors, metadata = load_checkpoint(ckpt)
    assert_same(tensors, sample_tensors())
    assert metadata == read_metadata(ckpt) == METADATA
