"""The optimizer step's per-element passes as one compiled C loop per pass (CPU).

PyTorch runs the learned update as dozens of full-size elementwise ops per NF-layer, each a trip
through memory; the same arithmetic fused into a loop over small blocks reads the parameter,
gradient and statistics once per pass and keeps every feature and hidden channel in cache. The
loop (``fused_step.c``, shipped with the package) is compiled on first use with the system's C
compiler into a per-user cache (:func:`cache_dir`), once per machine and source version (about
two seconds), and called through ctypes; its rows are shared among OpenMP threads, as many as
``torch.get_num_threads()``.

Without a compiler, or with ``NFOPT_FUSED=0``, or for tensors the loop does not take (not on the
CPU, not float32/float64, not contiguous, an axis order that needs a permute, an activation it
does not know), the step takes the PyTorch path, with the same results to rounding.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ..nn.layer import Terms
from ..nn.plan import Bucket
from .features import SQRT_FLOOR, bias_corrections, context, snr_scales

SOURCE = Path(__file__).with_name("fused_step.c")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared") + (
    ("-mprefer-vector-width=512",) if platform.machine().lower() in ("x86_64", "amd64") else ()
)
MAX_LAYERS, MAX_CHANNELS, MAX_TERMS, MAX_ACC, MAX_MOMENTA, NDIM = 4, 32, 8, 8, 8, 4
PARALLEL_ELEMENTS = 1 << 15
"""Elements of a bucket below which a pass stays on one thread."""

ACTIVATIONS = {None: 0, torch.relu_: 1, nn.functional.gelu: 2, torch.tanh_: 3}
"""The nonlinearities the loop knows, by the callable the NFN applies."""

_NAMES = {torch.float32: "f32", torch.float64: "f64"}


class _Pass(ctypes.Structure):
    """``Pass`` of fused_step.c; its REAL pointers are plain addresses here."""

    _i64, _f64, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_void_p
    _fields_ = [
        ("n", _i64 * NDIM),
        ("lane", _i64), ("merged", _i64),
        ("members", _i64), ("threads", _i64),
        ("momenta", _i64), ("adam_index", _i64), ("n_layers", _i64), ("mode", _i64),
        ("activation", _i64), ("flips", _i64), ("gate", _i64),
        ("width", _i64 * (MAX_LAYERS + 1)),
        ("p", _ptr), ("g", _ptr), ("m", _ptr), ("v", _ptr),
        ("member", _ptr),
        ("rates", _f64 * MAX_MOMENTA),
        ("v_rate", _f64), ("eps", _f64), ("sqrt_floor", _f64), ("rms_eps", _f64), ("beta_over_bound", _f64),
        ("gamma", _f64), ("bound", _f64), ("limit", _f64), ("snr", _f64),
        ("a", _ptr * MAX_LAYERS),
        ("a_member_stride", _i64 * MAX_LAYERS),
        ("constant", _ptr * MAX_LAYERS),
        ("n_terms", _i64 * MAX_LAYERS),
        ("term", (_ptr * MAX_TERMS) * MAX_LAYERS),
        ("term_stride", ((_i64 * 6) * MAX_TERMS) * MAX_LAYERS),
        ("n_acc", _i64),
        ("acc", _ptr * MAX_ACC),
        ("acc_size", _i64 * MAX_ACC),
        ("acc_stride", (_i64 * 6) * MAX_ACC),
        ("acc_scale", _f64 * MAX_ACC),
        ("mean", _ptr * MAX_ACC),
        ("sumsq", _ptr), ("gsum", _ptr), ("inverse_rms", _ptr), ("finite", _ptr), ("rootsq", _ptr),
    ]


def cache_dir() -> Path:
    """Where compiled loops are kept: ``$NFOPT_CACHE_DIR``, else the user's cache directory."""
    if os.environ.get("NFOPT_CACHE_DIR"):
        return Path(os.environ["NFOPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nfopt"


def _machine_key(compiler: str) -> str:
    """What a compiled loop depends on: source, flags, compiler and CPU (``-march=native``)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = platform.machine()
    try:
        cpu += next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        cpu += platform.processor()
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), cpu.encode()):
        digest.update(part)
    return digest.hexdigest()[:16]


_lock = threading.Lock()


def library(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    """The compiled pass for ``dtype`` (float32 or float64), or None where it cannot be had
    (then one warning says why and that the step is slower) or is switched off (``NFOPT_FUSED=0``)."""
    if os.environ.get("NFOPT_FUSED", "1") == "0":
        return None
    return _compiled(dtype)


@lru_cache(maxsize=None)
def _compiled(dtype: torch.dtype) -> ctypes._CFuncPtr | None:
    with _lock:
        try:
            return _load(dtype)
        except (OSError, subprocess.SubprocessError) as e:
            warnings.warn(
                f"nfopt: the fused CPU step could not be compiled ({e}); the optimizer steps through "
                "PyTorch ops instead, several times slower (set NFOPT_FUSED=0 to choose that quietly)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None


def compiler() -> str:
    """The C compiler the loop is built with: ``$CC``, else ``cc``, else ``gcc``."""
    found = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if found is None:
        raise OSError("no C compiler found (set CC)")
    return found


def _load(dtype: torch.dtype) -> ctypes._CFuncPtr:
    cc = compiler()
    name = _NAMES[dtype]
    folder = cache_dir() / _machine_key(cc)
    target = folder / f"fused_step_{name}.so"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        defines = ["-DREAL=double", "-DREAL_IS_DOUBLE"] if dtype == torch.float64 else ["-DREAL=float"]
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            done = subprocess.run(
                [cc, *FLAGS, *defines, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300
            )
            if done.returncode:
                raise OSError(f"{cc} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: processes that compile at once each see a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    entry = getattr(ctypes.CDLL(str(target)), f"nfopt_pass_{name}")
    entry.argtypes = [ctypes.POINTER(_Pass)]
    entry.restype = ctypes.c_int
    return entry


def _padded(shape: Sequence[int]) -> tuple[int, ...]:
    return (1,) * (NDIM - len(shape)) + tuple(shape)


def _layout(canonical: Sequence[int]) -> tuple[int, bool]:
    """Which dim of a bucket's tensors the loop takes in vectors: the last (contiguous) where it
    is long enough to fill them; for a short last dim under two others (conv kernels), the last
    two together; else the longest (read with a stride; the innermost of equals). And whether
    the last two are taken together."""
    n = _padded(canonical)
    if n[3] >= 16 or n[3] == max(n):
        return 3, False
    if len(canonical) >= 3 and n[2] * n[3] >= 16:
        return 2, True
    return max(range(NDIM), key=lambda d: (n[d], d)), False


def _lane_contiguous(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with unit stride along ``dim`` (where it is longer than one), as the loop reads it."""
    if t.shape[dim] > 1 and t.stride(dim) != 1:
        t = t.movedim(dim, -1).contiguous().movedim(-1, dim)
    return t


def _strides(t: torch.Tensor) -> list[int]:
    """Element strides of a (B, C, *canonical) tensor over (member, channel, d0..d3) after
    padding the canonical dims in front; 0 along every broadcast (size-1) dim."""
    dims = [st if n > 1 else 0 for st, n in zip(t.stride(), t.shape)]
    return dims[:2] + [0] * (NDIM + 2 - t.dim()) + dims[2:]


def _per_member(values: Sequence[float | torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per-member rates as a (B,) tensor: one op where they are plain numbers."""
    if all(isinstance(v, (int, float)) for v in values):
        return torch.tensor(values, dtype=dtype)
    return torch.stack([torch.as_tensor(v, dtype=dtype) for v in values])


class KnownMeans:
    """Means already computed, keyed by the dims they average over (see :class:`~nfopt.nn.layer.Means`)."""

    def __init__(self, means: dict[frozenset[int], torch.Tensor]) -> None:
        self._means = means

    def mean(self, dims: Sequence[int]) -> torch.Tensor:
        return self._means[frozenset(dims)]


class _Workspace:
    """What a bucket's passes reuse from step to step: a filled struct per pass and its buffers."""

    def __init__(self, bucket: Bucket, dtype: torch.dtype, widths: tuple[int, ...], config: object, flips: bool,
                 activation: int, threads: int) -> None:
        cfg = config.features
        members, canonical = len(bucket.members), bucket.plan.canonical
        self.dtype, self.widths, self.canonical, self.threads = dtype, widths, canonical, threads
        self.pointers = [(ctypes.c_void_p * members)() for _ in range(4)]  # p, g, m, v of each member
        base = _Pass()
        base.n[:] = _padded(canonical)
        base.lane, merged = _layout(canonical)
        base.merged = int(merged)
        self.lane_dim = 2 + base.lane - (NDIM - len(canonical))  # in (B, C, *canonical)
        self.merged = merged
        base.members, base.threads = members, threads
        base.momenta, base.adam_index, base.n_layers = len(cfg.momentum_decays), cfg.adam_momentum, len(widths) - 1
        base.activation, base.flips, base.gate = activation, int(flips), int(config.gate_floor > 0)
        base.width[: len(widths)] = widths
        base.p, base.g, base.m, base.v = (ctypes.addressof(a) for a in self.pointers)
        base.rates[: len(cfg.momentum_decays)] = [1 - d for d in cfg.momentum_decays]
        base.v_rate, base.eps, base.sqrt_floor, base.rms_eps = 1 - cfg.beta2, cfg.eps, SQRT_FLOOR, cfg.rms_eps
        base.bound, base.limit = config.max_deviation, config.max_log_scale
        base.snr = config.snr_gate**2  # κ² of the signal-to-noise gate; 0 without it
        self.base = base
        c0 = widths[0]
        self.sumsq = torch.empty((threads, members, c0), dtype=torch.float64)
        self.gsum = torch.empty((threads, members), dtype=torch.float64)
        self.rootsq = torch.empty((threads, members), dtype=torch.float64)
        self.inverse_rms = torch.empty((members, c0), dtype=dtype)
        self.finite = torch.empty(members, dtype=dtype)
        self._passes: dict[int, tuple[tuple[frozenset[int], ...], _Pass, dict[frozenset[int], torch.Tensor]]] = {}
        self._buffers: list[torch.Tensor] = []  # what the structs point to

    def prepared(self, mode: int, dims: Sequence[tuple[int, ...]]) -> tuple[_Pass, dict[frozenset[int], torch.Tensor]]:
        """The struct of a pass that averages over ``dims``, and the tensors it writes the means to."""
        keys = tuple(dict.fromkeys(frozenset(d) for d in dims))
        if mode in self._passes and self._passes[mode][0] == keys:
            return self._passes[mode][1:]
        derived = self._derived(keys)
        direct = tuple(dict.fromkeys([k for k in keys if k not in derived] + list(derived.values())))
        if len(direct) > MAX_ACC:
            raise ValueError(f"{len(direct)} means, the fused loop takes {MAX_ACC}")
        s = _Pass()
        ctypes.memmove(ctypes.addressof(s), ctypes.addressof(self.base), ctypes.sizeof(s))
        s.mode, s.n_acc = mode, len(direct)
        members, channels = self.base.members, self.widths[mode]
        means, keep = {}, []
        for t, key in enumerate(direct):
            shape = (members, channels, *(1 if i + 2 in key else n for i, n in enumerate(self.canonical)))
            mean = torch.empty(shape, dtype=self.dtype)
            if not self.merged:
                mean = _lane_contiguous(mean, self.lane_dim)
            acc = torch.empty((self.threads, mean.numel()), dtype=torch.float64)
            keep.append(acc)
            means[key] = mean
            s.acc[t], s.acc_size[t], s.mean[t] = acc.data_ptr(), mean.numel(), mean.data_ptr()
            s.acc_stride[t][:] = _strides(mean)
            s.acc_scale[t] = 1.0 / math.prod(self.canonical[d - 2] for d in key)
        s.inverse_rms = self.inverse_rms.data_ptr()
        if mode == 0:
            s.sumsq, s.gsum, s.finite = self.sumsq.data_ptr(), self.gsum.data_ptr(), self.finite.data_ptr()
            s.rootsq = self.rootsq.data_ptr()
        self._passes[mode] = (keys, s, _DerivedMeans(means, derived, self.canonical))
        self._buffers += keep
        return self._passes[mode][1:]

    def loop_term(self, term: torch.Tensor) -> torch.Tensor:
        """A broadcast term laid out as the loop reads it: unit stride along the lanes; with the
        last two dims merged, contiguous, and varying along the last wherever it varies along the
        second last."""
        if not self.merged:
            return _lane_contiguous(term, self.lane_dim)
        if term.shape[-1] == 1 and term.shape[-2] > 1:
            term = term.expand(*term.shape[:-1], self.canonical[-1])
        return term.contiguous()

    def _derived(self, keys: Sequence[frozenset[int]]) -> dict[frozenset[int], frozenset[int]]:
        """Means the loop cannot take with the last two dims merged (those that keep the second
        last and average the last), each from the one that keeps both: key -> source."""
        if not self.merged:
            return {}
        d2, d3 = 2 + len(self.canonical) - 2, 2 + len(self.canonical) - 1
        return {k: k - {d3} for k in keys if d2 not in k and d3 in k and self.canonical[-2] > 1 and self.canonical[-1] > 1}


class _DerivedMeans(dict):
    """The means a pass writes, keyed by their dims, and those reduced from them after it runs."""

    def __init__(self, means: dict[frozenset[int], torch.Tensor], derived: dict[frozenset[int], frozenset[int]],
                 canonical: tuple[int, ...]) -> None:
        super().__init__(means)
        self.derived = derived
        self.last = 1 + len(canonical)

    def complete(self) -> dict[frozenset[int], torch.Tensor]:
        out = dict(self)
        for key, source in self.derived.items():
            out[key] = self[source].mean(self.last, keepdim=True)
        return out


_WORKSPACES: OrderedDict[tuple, _Workspace] = OrderedDict()
MAX_WORKSPACES = 256


def _workspace(key: tuple, make: Callable[[], _Workspace]) -> _Workspace:
    if key in _WORKSPACES:
        _WORKSPACES.move_to_end(key)
        return _WORKSPACES[key]
    _WORKSPACES[key] = ws = make()
    if len(_WORKSPACES) > MAX_WORKSPACES:
        _WORKSPACES.popitem(last=False)
    return ws


class FusedPasses:
    """A bucket's in-place step through the compiled loop (see
    :class:`~nfopt.nn.nfn.BucketPasses`): one pass for the features' means, one per hidden
    layer's, and one for the update, each a read of the members' parameters, gradients and
    statistics where they are (no stacking); the last also writes them."""

    def __init__(
        self, entry: ctypes._CFuncPtr, rule: nn.Module, scalars: tuple[torch.Tensor, float, float], bucket: Bucket,
        params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
        lrs: list[float | torch.Tensor], weight_decays: list[float | torch.Tensor], widths: Sequence[int],
        activation: object,
    ) -> None:
        dtype, widths = params[0].dtype, tuple(widths)
        flips = bucket.plan.factor_group == "sign"
        threads = torch.get_num_threads() if len(params) * params[0].numel() >= PARALLEL_ELEMENTS else 1
        key = (bucket, dtype, widths, rule.config, flips, activation, threads, threading.get_ident())
        self._ws = _workspace(key, lambda: _Workspace(bucket, dtype, widths, rule.config, flips, ACTIVATIONS[activation], threads))
        for array, tensors in zip(self._ws.pointers, (params, grads, [s["momenta"] for s in states], [s["v"] for s in states])):
            array[:] = [t.data_ptr() for t in tensors]
        self._entry, self.rule, self.bucket, self.states = entry, rule, bucket, states
        self.lrs, self.weight_decays, self.scalars = lrs, weight_decays, scalars
        self.ok: torch.Tensor | None = None

    @staticmethod
    def accepts(
        bucket: Bucket, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
        widths: Sequence[int], momenta: int, activation: object,
    ) -> bool:
        """Whether the loop can take this bucket as it is (else the PyTorch path does)."""
        dtype = params[0].dtype
        if dtype not in _NAMES or bucket.plan.perm is not None or len(bucket.plan.canonical) > NDIM:
            return False
        if len(widths) - 1 > MAX_LAYERS or max(widths) > MAX_CHANNELS or momenta > MAX_MOMENTA:
            return False
        if bucket.plan.factor_group not in ("none", "sign") or activation not in ACTIVATIONS:
            return False
        tensors = [*params, *grads, *(t for st in states for t in (st["momenta"], st["v"]))]
        return params[0].numel() > 0 and all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)

    def _run(self, s: _Pass, parts: Sequence[Terms] = ()) -> int:
        keep = []
        for l, part in enumerate(parts):
            a = part.a.contiguous()
            s.a[l], s.a_member_stride[l] = a.data_ptr(), a.shape[-1] * a.shape[-2] if a.dim() == 3 else 0
            const = None if part.const is None else part.const.contiguous()
            s.constant[l] = None if const is None else const.data_ptr()
            if len(part.terms) > MAX_TERMS:
                raise ValueError(f"{len(part.terms)} broadcast terms, the fused loop takes {MAX_TERMS}")
            s.n_terms[l] = len(part.terms)
            for t, term in enumerate(part.terms):
                term = self._ws.loop_term(term)
                s.term[l][t] = term.data_ptr()
                s.term_stride[l][t][:] = _strides(term)
                keep.append(term)
            keep += [a, const]
        code = self._entry(ctypes.byref(s))
        if code == 1:
            raise RuntimeError("the fused step was given more channels, layers, terms or momenta than it takes")
        if code == 3:
            raise MemoryError("the fused step ran out of memory for its sums")
        return code

    def first_pass(self, dims: Sequence[tuple[int, ...]], member: torch.Tensor) -> bool:
        """Pass 0 with the members' scalars ``member`` (B, 8): the features' inverse RMS and the
        means over ``dims`` of the features scaled by it; False where a gradient held a
        non-finite value (see ``finite``)."""
        ws = self._ws
        _, ws.base.beta_over_bound, ws.base.gamma = self.scalars
        self._member = member  # what the loop reads in every pass
        ws.base.member = member.data_ptr()
        s, self._means = self._prepared(0, dims)
        return self._run(s) != 2

    @property
    def finite(self) -> torch.Tensor:
        """(B,) 1 where the member's gradient was finite in the last pass 0."""
        return self._ws.finite

    @property
    def inverse_rms(self) -> torch.Tensor:
        """(B, C) the inverse RMS of the members' features from the last pass 0."""
        return self._ws.inverse_rms

    @property
    def root_sums(self) -> torch.Tensor:
        """(B,) float64: each member's sum of v̂ + ε (sqrt(v̂ + ε) squared) over its elements, from
        the last pass 0 of a rule with a gate (read before the bucket's next step)."""
        return self._ws.rootsq[0]

    def set_gate(self, floor: torch.Tensor) -> None:
        """The members' F·ref (B,) of the gate, which the last pass reads from their scalars."""
        self._member[:, 5] = floor

    @property
    def steps(self) -> torch.Tensor:
        """(B,) the members' step counts after this update (after pass 0)."""
        return torch.stack([st["step"] for st in self.states])

    def scale_rates(self, scales: torch.Tensor) -> None:
        """The members' per-tensor step factors (B,), which scale the rates the last pass reads."""
        self._member[:, 3] *= scales.to(self._member.dtype)

    def known_means(self) -> KnownMeans:
        return KnownMeans(self._means.complete())

    def means(self, parts: Sequence[Terms], dims: Sequence[tuple[int, ...]]) -> KnownMeans:
        s, means = self._prepared(len(parts), dims)
        self._run(s, parts)
        return KnownMeans(means.complete())

    def finish(self, parts: Sequence[Terms]) -> None:
        s, _ = self._prepared(len(parts), ())
        self._run(s, parts)

    def _prepared(self, mode: int, dims: Sequence[tuple[int, ...]]) -> tuple[_Pass, dict[frozenset[int], torch.Tensor]]:
        s, means = self._ws.prepared(mode, dims)
        s.member, s.beta_over_bound, s.gamma = self._ws.base.member, self._ws.base.beta_over_bound, self._ws.base.gamma
        return s, means

    def write_back(self) -> None:
        """Nothing: the last pass wrote every member in place."""


class FusedStep:
    """The buckets of one step that the loop takes (of one dtype), with their members' scalars
    computed for all of them at once, a few ops a step instead of a few per bucket: step
    counters, bias corrections, rates, weight decays and context, as the PyTorch path computes
    them (elementwise, so that both agree to the last bit)."""

    def __init__(self, passes: Sequence[FusedPasses]) -> None:
        self.passes = list(passes)
        first = self.passes[0]
        self._cfg, self._alpha, dtype = first.rule.config.features, first.scalars[0], first._ws.dtype
        config = first.rule.config
        self._snr = config.snr_margin if config.snr_gate else None  # the gate's margin, None without it
        self._counters = [st["step"] for p in self.passes for st in p.states]
        self._before = torch.stack(self._counters)
        self._sizes = [len(p.states) for p in self.passes]
        self._rates = [_per_member([v for p in self.passes for v in values(p)], dtype)
                       for values in (lambda p: p.lrs, lambda p: p.weight_decays)]
        self._member = self._table(torch.ones(len(self._counters), dtype=dtype))

    def _table(self, ok: torch.Tensor) -> torch.Tensor:
        """The loop's per-member scalars (N, 8): flag, bias corrections, rate, weight decay, the
        gate's F·ref (set after pass 0, see :meth:`FusedPasses.set_gate`) and, with the
        signal-to-noise gate, the factor and offset of its q (else 0, 0)."""
        self.ok, self.step = ok, self._before + ok
        bc1, bc2 = bias_corrections(self.step, self._cfg)
        lr, wd = self._rates
        zero = torch.zeros_like(ok)
        c, b = (zero, zero) if self._snr is None else snr_scales(self.step, self._cfg, self._snr)
        return torch.stack([ok, bc1, bc2, (lr * ok) * self._alpha, wd, zero, c, b], 1).to(torch.float64)

    def statistics(self, dims: Sequence[Sequence[tuple[int, ...]]]) -> list[tuple[KnownMeans, torch.Tensor, None]]:
        """Every bucket's pass 0 (``dims[b]``: the means bucket b's first layer needs): its means
        and context, and None for its scales (the means are of the scaled features, and later
        passes scale the first layer's weights); the step counters advance. A member whose
        gradient is not finite is held still: its bucket's means are taken again without it."""
        members = self._member.split(self._sizes)
        held = [b for b, (p, m) in enumerate(zip(self.passes, members)) if not p.first_pass(dims[b], m)]
        if held:
            ok = torch.cat([p.finite.clone() if b in held else torch.ones_like(p.finite) for b, p in enumerate(self.passes)])
            self._member.copy_(self._table(ok))
            for b in held:
                self.passes[b].first_pass(dims[b], members[b])
        torch._foreach_copy_(self._counters, list(self.step.unbind(0)))
        inv = torch.cat([p.inverse_rms for p in self.passes])
        for p, ok in zip(self.passes, self.ok.split(self._sizes)):
            p.ok = ok
        contexts = context(self.step, inv, self._cfg).split(self._sizes)
        return [(p.known_means(), c, None) for p, c in zip(self.passes, contexts)]
