"""Checkpoint files: round trips, safetensors interoperability, corruption, atomicity, no pickle,
and the learned rule stored in them."""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from nfopt.io import (
    FORMAT_VERSION,
    RULE_CONTENT,
    CheckpointError,
    load_checkpoint,
    load_rule,
    read_metadata,
    save_checkpoint,
    save_rule,
)
from nfopt.optim.optimizer import default_checkpoint_path
from nfopt.optim.rule import OPTIONAL, LearnedUpdate, UpdateConfig

ROOT = Path(__file__).resolve().parents[1]

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


def test_loaded_tensors_survive_the_file_being_rewritten_in_place(ckpt):
    """Tensors that still mapped the file would crash (SIGBUS) once it is truncated in place, so
    this runs in a child process."""
    script = (
        "import sys, torch; from nfopt.io import load_checkpoint\n"
        "tensors, _ = load_checkpoint(sys.argv[1])\n"
        "open(sys.argv[1], 'wb').close()\n"
        "print(float(tensors['f32'].sum()), float(tensors['f64'].sum()))\n"
    )
    child = subprocess.run([sys.executable, "-c", script, ckpt], capture_output=True, text=True, cwd=ROOT)
    assert child.returncode == 0, child.stderr
    expected = sample_tensors()
    assert child.stdout.split() == [str(float(expected["f32"].sum())), str(float(expected["f64"].sum()))]


def test_map_location_moves_tensors(ckpt):
    tensors, _ = load_checkpoint(ckpt, map_location=torch.device("meta"))
    assert all(t.device.type == "meta" for t in tensors.values())
    assert tensors["bf16"].dtype == torch.bfloat16 and tensors["bf16"].shape == (2, 3)


def test_tensors_sharing_memory_are_stored_separately(tmp_path):
    tied = torch.arange(6.0)
    path = tmp_path / "tied.nfopt"
    save_checkpoint(path, {"a": tied, "b": tied, "head": tied[:2]}, {})
    tensors, _ = load_checkpoint(path)
    assert_same(tensors, {"a": tied, "b": tied, "head": tied[:2]})


@pytest.mark.parametrize(
    "tensors, metadata, error",
    [
        ({"x": torch.zeros(2, dtype=torch.complex128)}, {}, TypeError),
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
    assert_same(safetensors.torch.load_file(ckpt), sample_tensors())
    with safetensors.safe_open(ckpt, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format_version"] == str(FORMAT_VERSION)
    assert json.loads(metadata["nfopt"]) == METADATA


def test_we_load_files_from_the_reference_writer(tmp_path):
    path = tmp_path / "ref.safetensors"
    tensors = sample_tensors()
    safetensors.torch.save_file(
        tensors, str(path), metadata={"format_version": "1", "nfopt": json.dumps(METADATA)}
    )
    loaded, metadata = load_checkpoint(path)
    assert_same(loaded, tensors)
    assert metadata == METADATA


def test_plain_safetensors_file_is_not_an_nfopt_checkpoint(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, str(path))
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
    assert_error(excinfo, ckpt, "bytes appended after the tensor data")


INVALID = "not a valid safetensors file"

BAD_HEADERS = {
    "no metadata": ({"w": entry("U8", [2], [0, 2])}, "no '__metadata__'"),
    "metadata not strings": (
        {"__metadata__": {"format_version": 1, "nfopt": "{}"}},
        INVALID, "expected a string",
    ),
    "missing version": ({"__metadata__": {"nfopt": "{}"}}, "no 'format_version'"),
    "missing nfopt": ({"__metadata__": {"format_version": "1"}}, "no 'nfopt'"),
    "non-integer version": (nfopt_header(version="one"), "unsupported format_version 'one'"),
    "version zero": (nfopt_header(version="0"), "unsupported format_version '0'"),
    "future version": (nfopt_header(version=str(FORMAT_VERSION + 1)), "newer nfopt", "upgrade"),
    "nfopt not JSON": (
        {"__metadata__": {"format_version": "1", "nfopt": "{oops"}},
        "'nfopt' is not valid JSON",
    ),
    "nfopt not object": (
        {"__metadata__": {"format_version": "1", "nfopt": "[1]"}},
        "JSON list, not an object",
    ),
    "unknown dtype": (nfopt_header(w=entry("F8", [1], [0, 1])), INVALID, "`F8`"),
    "offsets vs shape": (
        nfopt_header(w=entry("F32", [2, 3], [0, 20])),
        INVALID, "invalid shape, data type, or offset",
    ),
    "negative dim": (nfopt_header(w=entry("F32", [-1], [0, 0])), INVALID, "`-1`"),
    "bool dim": (nfopt_header(w=entry("U8", [True], [0, 1])), INVALID, "boolean"),
    "bad offsets": (nfopt_header(w=entry("U8", [1], [0])), INVALID, "invalid length 1"),
    "missing key": (nfopt_header(w={"dtype": "U8", "shape": [1]}), INVALID, "`data_offsets`"),
    "overlap": (
        nfopt_header(a=entry("U8", [4], [0, 4]), b=entry("U8", [4], [2, 6])),
        INVALID, "invalid offset for tensor `b`",
    ),
    "gap": (
        nfopt_header(a=entry("U8", [2], [0, 2]), b=entry("U8", [2], [4, 6])),
        INVALID, "invalid offset for tensor `b`",
    ),
    "offset past end": (nfopt_header(w=entry("U8", [4], [0, 4])), INVALID, "file truncated"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_are_reported_with_reason(tmp_path, case, reader):
    header, *reason = BAD_HEADERS[case]
    path = tmp_path / "bad.nfopt"
    write_raw(path, header, data=b"\0\0" if set(header) - {"__metadata__"} else b"")
    with pytest.raises(CheckpointError) as excinfo:
        reader(path)
    assert_error(excinfo, path, *reason)


def length_prefixed(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


BAD_BYTES = {
    "garbage header": (length_prefixed(b"\xff\xfe garbage \x80"), "invalid UTF-8"),
    "non-JSON header": (length_prefixed(b"{not json}"), "invalid JSON"),
    "header not an object": (length_prefixed(b"[1, 2]"), "invalid JSON"),
    "duplicate key": (
        length_prefixed(b'{"__metadata__": {"format_version": "1", "nfopt": "{}"}, "__metadata__": {}}'),
        "duplicate field `__metadata__`",
    ),
    "header longer than file": (struct.pack("<Q", 1000) + b"{}", "invalid header length", "truncated"),
    "absurd header length": (struct.pack("<Q", 2**40) + b"{}", "header too large"),
    "shorter than length field": (b"\x02\x00\x00", "header too small", "truncated"),
    "empty file": (b"", "header too small"),
    "random bytes": (random.Random(0).randbytes(4096), "header too large"),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_malformed_bytes_are_reported_with_reason(tmp_path, case, reader):
    content, *reason = BAD_BYTES[case]
    path = tmp_path / "bad.nfopt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as excinfo:
        reader(path)
    assert_error(excinfo, path, INVALID, *reason)
    assert "torch.save" not in str(excinfo.value)


def test_corrupting_any_header_byte_raises_only_checkpoint_errors(ckpt, tmp_path):
    """Whatever a flipped byte does to the header, the library's exceptions never escape raw."""
    raw = open(ckpt, "rb").read()
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    rng = random.Random(0)
    path = tmp_path / "flipped.nfopt"
    failures = 0
    for position in range(header_end):
        path.write_bytes(raw[:position] + bytes([raw[position] ^ rng.randrange(1, 256)]) + raw[position + 1 :])
        try:
            load_checkpoint(path)
        except CheckpointError as e:
            assert e.path == str(path) and e.reason
            failures += 1
    assert failures > header_end // 2  # most flips break the header, and each one said so


@pytest.mark.parametrize("zipfile_format", [True, False])
def test_torch_save_files_are_refused_without_unpickling(tmp_path, monkeypatch, zipfile_format):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=zipfile_format)
    forbid_unpickling(monkeypatch)
    with pytest.raises(CheckpointError) as excinfo:
        load_checkpoint(path)
    assert_error(excinfo, path, "looks like a torch.save file", "not supported", "unpickles")


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


def test_interrupted_save_leaves_old_file_and_no_temporary(ckpt, tmp_path, monkeypatch):
    """Interrupted (Ctrl-C) once the new file is written in full under its temporary name."""
    before = open(ckpt, "rb").read()
    real_fsync = os.fsync
    seen = []

    def fsync_then_interrupt(fd):
        real_fsync(fd)
        seen.extend(sorted(os.listdir(tmp_path)))
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, sample_tensors(), {"new": True})
    monkeypatch.undo()
    assert len(seen) == 2 and seen[0].startswith(".model.nfopt.") and seen[0].endswith(".tmp")
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


# ----------------------------------------------------------------------------- learned rules


def save_fresh(path, **cfg) -> LearnedUpdate:
    torch.manual_seed(0)
    rule = LearnedUpdate(UpdateConfig(**cfg))
    save_rule(rule, path, provenance={"seed": 0})
    return rule


def assert_same_rule(actual: LearnedUpdate, expected: LearnedUpdate) -> None:
    assert actual.config == expected.config
    assert_same(actual.state_dict(), expected.state_dict())


def test_rule_round_trip(tmp_path):
    path = tmp_path / "r.nfopt"
    rule = save_fresh(path, hidden_channels=5, n_layers=3, activation="gelu")
    back = load_rule(path)
    assert_same_rule(back, rule)
    assert back.provenance == {"seed": 0}
    assert read_metadata(path)["content"] == RULE_CONTENT and "kind" not in read_metadata(path)


def rewrite(path, mutate_tensors=None, mutate_meta=None):
    tensors, meta = load_checkpoint(path)
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    save_checkpoint(path, tensors, meta)


def old_style(meta: dict) -> None:
    """Metadata as nfopt wrote it before the content tag's key was renamed."""
    meta["kind"] = meta.pop("content")


def test_rule_files_with_the_old_content_key_load(tmp_path):
    path = tmp_path / "old.nfopt"
    rule = save_fresh(path)
    rewrite(path, mutate_meta=old_style)
    assert "content" not in read_metadata(path) and read_metadata(path)["kind"] == RULE_CONTENT
    assert_same_rule(load_rule(path), rule)


@pytest.mark.parametrize(
    "gates",
    [{"gate_floor": 0.25}, {"snr_gate": 0.5}, {"gate_floor": 0.25, "snr_gate": 0.5}, {"snr_gate": 0.5, "snr_margin": 8.0},
     {"snr_gate": 0.5, "tensor_log_scale": 3.0}],
)
def test_a_gated_rule_round_trips(tmp_path, gates):
    path = tmp_path / "gated.nfopt"
    rule = save_fresh(path, **gates)
    back = load_rule(path)
    assert_same_rule(back, rule)
    for name, value in gates.items():
        assert getattr(back.config, name) == value and read_metadata(path)["config"][name] == value


def test_rules_without_a_gate_are_written_and_read_as_before_it_existed(tmp_path):
    """A rule without the gate is written without the key (files earlier versions read); a config
    without it, as every earlier file has, loads as a rule without the gate."""
    path = tmp_path / "plain.nfopt"
    rule = save_fresh(path, hidden_channels=5)
    assert not set(OPTIONAL) & set(read_metadata(path)["config"])
    rewrite(path, mutate_meta=lambda m: m["config"].pop("gate_floor", None))
    back = load_rule(path)
    assert_same_rule(back, rule)
    assert all(getattr(back.config, name) == 0.0 for name in OPTIONAL) and not hasattr(back, "tensor_head")
    earlier = ROOT / "benchmarks" / "checkpoints" / "pooled_last.nfopt"
    assert "gate_floor" not in read_metadata(earlier)["config"]
    assert load_rule(earlier).config.gate_floor == 0.0


def test_committed_checkpoints_load_as_rules():
    """The shipped default and the benchmark checkpoints, all written by earlier nfopt versions."""
    paths = [default_checkpoint_path(), *sorted((ROOT / "benchmarks" / "checkpoints").rglob("*.nfopt"))]
    assert len(paths) > 1
    for path in paths:
        rule = load_rule(path)
        tensors, _ = load_checkpoint(path)
        assert_same(rule.state_dict(), tensors)
        assert rule.provenance, path


@pytest.mark.parametrize(
    "mutate_tensors,mutate_meta,reason",
    [
        (lambda t: t.pop("log_beta"), None, "missing"),
        (lambda t: t.__setitem__("extra", torch.zeros(1)), None, "unexpected"),
        (lambda t: t.__setitem__("log_alpha", torch.zeros(2)), None, "shape"),
        (lambda t: t.__setitem__("log_alpha", torch.tensor(1)), None, "floating point"),
        (lambda t: t.__setitem__("log_alpha", torch.tensor(float("nan"))), None, "non-finite"),
        (lambda t: t["nfn.layers.0.A"].view(-1)[0].fill_(float("inf")), None, "non-finite"),
        (None, lambda m: m["config"].__setitem__("hidden_channels", 9), "do not match|shape"),
        (None, lambda m: m.__setitem__("content", "something else"), "not a learned-update"),
        (None, lambda m: m.pop("content"), "not a learned-update"),
        (None, lambda m: (old_style(m), m.__setitem__("kind", "something else")), "not a learned-update"),
        (None, lambda m: m["config"].__setitem__("activation", "swish"), "config cannot be read"),
        (None, lambda m: m["config"].__setitem__("alpha", -1.0), "config cannot be read"),
        (None, lambda m: m["config"].__setitem__("gate_floor", -0.1), "config cannot be read"),
        (None, lambda m: m.pop("config"), "config cannot be read"),
    ],
)
def test_mismatched_rule_checkpoint_names_file_and_reason(tmp_path, mutate_tensors, mutate_meta, reason):
    path = tmp_path / "bad.nfopt"
    save_fresh(path)
    rewrite(path, mutate_tensors, mutate_meta)
    with pytest.raises(CheckpointError, match=reason) as e:
        load_rule(path)
    assert str(path) in str(e.value)


def test_truncated_and_future_rule_files_fail_loudly(tmp_path):
    path = tmp_path / "r.nfopt"
    save_fresh(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_rule(path)
    assert str(path) in str(e.value)
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["format_version"] = "99"
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n :])
    with pytest.raises(CheckpointError, match="newer"):
        load_rule(path)
