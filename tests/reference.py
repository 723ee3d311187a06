"""The learned update rule written out plainly: the specification the fast code is checked against.

One step of :class:`nfopt.optim.rule.LearnedUpdate`, from the definitions (README, "How an update
is computed" and "NF-layers"; the docstrings of ``nfopt.nn.layer`` and ``nfopt.nn.plan``), one
tensor and one term at a time, with nothing cached, folded or batched. Of nfopt it uses only the
weight-space specs; the rule's weights are read by name (``rule.nfn.layers[i].A``, ``.B``, ``.N``,
``.G``, ``.E``, ``.bias``, ``rule.log_alpha``, ...) and its shape from ``rule.config``.

How a layer's weights are laid out (the conventions a checkpoint is read with):

- a tensor's *kind* is its number of labelled axes and whether fixed axes follow; ``A``, ``G``,
  ``E`` and ``bias`` hold one entry per kind, in the order of ``KINDS``;
- ``B`` holds one matrix per (kind, nonempty subset of the kind's labelled axes), in the order of
  ``KINDS`` and, within a kind, of ``Kind.subsets()``;
- an *axis type* is a kind and the position of one of its labelled axes; ``N`` holds one matrix
  per (own axis type, other axis type), at index ``own * len(AXIS_TYPES) + other``.

Features live in a tensor's *canonical layout*: channels, then the labelled axes in their order,
then all fixed axes merged into one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfopt.weight_space import AXIS_TYPES, KINDS, Kind, Label, MonomialSpec, TensorSpec, WeightSpaceSpec

SQRT_FLOOR = 1e-30
"""Added to v̂ inside its square root, so that sqrt's derivative stays finite where v̂ = 0."""

ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "tanh": torch.tanh}
"""The NFN's nonlinearity between layers, by the name in the rule's config."""

Statistics = dict[str, Tensor]
"""One tensor's optimizer state: ``step`` (0-d), ``momenta`` (one per decay, stacked) and ``v``."""


# ---- statistics, Adam's direction, features --------------------------------------------------------


def is_finite(g: Tensor) -> bool:
    """Whether every element of a gradient is finite."""
    # The library reads this off isfinite(g.sum()), which also calls a gradient non-finite when
    # only its sum overflows; the two agree on every gradient whose sum is representable.
    return bool(torch.isfinite(g).all())


def updated_statistics(g: Tensor, state: Statistics, decays: Sequence[float], beta2: float) -> Statistics:
    """After a finite gradient g: m_i ← d_i·m_i + (1 - d_i)·g for every decay d_i,
    v ← β₂·v + (1 - β₂)·g², and one more step."""
    momenta = torch.stack([d * m + (1 - d) * g for d, m in zip(decays, state["momenta"])])
    v = beta2 * state["v"] + (1 - beta2) * g * g
    return {"step": state["step"] + 1, "momenta": momenta, "v": v}


def adam_direction(
    state: Statistics, beta1_index: int, decays: Sequence[float], beta2: float, eps: float
) -> tuple[Tensor, Tensor]:
    """Adam's bias-corrected direction u = m̂ / (sqrt(v̂) + eps), and sqrt(v̂) (with its floor).

    m̂ = m / (1 - β₁^t) with β₁ the decay of momentum ``beta1_index``, v̂ = v / (1 - β₂^t).
    """
    t = state["step"].clamp(min=1)  # at step 0 (no finite gradient yet) m = v = 0, so u = 0
    m_hat = state["momenta"][beta1_index] / (1 - decays[beta1_index] ** t)
    v_hat = state["v"] / (1 - beta2**t)
    root_v = torch.sqrt(v_hat + SQRT_FLOOR)
    return m_hat / (root_v + eps), root_v


def polar(m: Tensor, eps: float) -> Tensor:
    """Five steps of Muon's quintic Newton-Schulz iteration X ← 3.4445·X - 4.7750·(XXᵀ)X +
    2.0315·(XXᵀ)²X from X = M/sqrt(‖M‖_F² + eps), M the tensor read as a matrix of its first
    dimension by the rest (a vector as a column, a scalar as 1x1), iterated on the wide side."""
    x = m.reshape(m.shape[0] if m.dim() else 1, -1)
    x = x / torch.sqrt(x.square().sum() + eps)
    wide = x.shape[0] <= x.shape[1]
    for _ in range(5):
        if wide:
            x = 3.4445 * x - 4.7750 * (x @ x.T) @ x + 2.0315 * (x @ x.T) @ (x @ x.T) @ x
        else:
            x = 3.4445 * x - 4.7750 * x @ (x.T @ x) + 2.0315 * x @ (x.T @ x) @ (x.T @ x)
    return x.reshape(m.shape)


def features(
    p: Tensor, g: Tensor, state: Statistics, u: Tensor, root_v: Tensor, rms_eps: float,
    time_scales: Sequence[float], polar_of: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The NFN's input on one tensor: per element, the channels [p, g, m_1..m_k, sqrt(v̂), u] (with
    [polar(polar_of, rms_eps)] after the momenta where given), each divided by its RMS over the tensor,
    sqrt(mean(x²) + rms_eps); and the tensor's context [tanh(t/s) for every time scale s,
    0.1·log RMS(p)] (t: the step count after this update)."""
    channels = [p, g, *state["momenta"], *([] if polar_of is None else [polar(polar_of, rms_eps)]), root_v, u]
    rms = [torch.sqrt(c.square().mean() + rms_eps) for c in channels]
    x = torch.stack([c / r for c, r in zip(channels, rms)])
    # The "log-RMS of the parameter" enters scaled by 0.1 (the library writes it as -0.1·log(1/RMS)).
    context = torch.stack([torch.tanh(state["step"] / s) for s in time_scales] + [0.1 * torch.log(rms[0])])
    return x, context


# ---- the group the rule is equivariant to ----------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A weight space and the neuron sets whose neurons may also flip sign (besides permuting)."""

    space: WeightSpaceSpec
    flipping: frozenset[Label]

    def flips_axis(self, ti: int, axis: int) -> bool:
        """Whether axis ``axis`` of tensor ``ti`` is indexed by neurons that flip."""
        return self.space.tensors[ti].axes[axis] in self.flipping

    def flips(self, ti: int) -> bool:
        """Whether tensor ``ti``'s elements change sign under some group element."""
        return any(self.flips_axis(ti, ax) for ax in self.space.tensors[ti].labelled_axes)

    def flips_besides(self, ti: int, axis: int) -> bool:
        """Whether a labelled axis of tensor ``ti`` other than ``axis`` flips."""
        return any(self.flips_axis(ti, ax) for ax in self.space.tensors[ti].labelled_axes if ax != axis)


def group_of(spec: WeightSpaceSpec | MonomialSpec, sign_flips: bool) -> Group:
    """The group a rule acts under: permutations, plus the spec's sign flips if the rule takes them."""
    if not isinstance(spec, MonomialSpec):
        return Group(spec, frozenset())
    if not sign_flips:
        return Group(spec.space, frozenset())  # a rule meta-trained without sign flips reads only permutations
    scaled = [label for label, symmetry in spec.symmetries if symmetry == "scale"]
    if scaled:
        raise ValueError(f"neuron sets {scaled} admit scalings, to which gradient training is not equivariant")
    return Group(spec.space, frozenset(label for label, symmetry in spec.symmetries if symmetry == "sign"))


# ---- canonical layout ------------------------------------------------------------------------------


def to_canonical(x: Tensor, t: TensorSpec) -> Tensor:
    """(C, *shape) -> (C, labelled axes in order..., [product of the fixed axes])."""
    order = t.labelled_axes + t.fixed_axes
    x = x.permute(0, *(1 + a for a in order))
    fixed = [math.prod(t.shape[a] for a in t.fixed_axes)] if t.fixed_axes else []
    return x.reshape(x.shape[0], *(t.shape[a] for a in t.labelled_axes), *fixed)


def from_canonical(y: Tensor, t: TensorSpec) -> Tensor:
    """The inverse of :func:`to_canonical`."""
    order = t.labelled_axes + t.fixed_axes
    y = y.reshape(y.shape[0], *(t.shape[a] for a in order))
    return y.permute(0, *(1 + order.index(a) for a in range(len(order))))


# ---- one NF-layer ----------------------------------------------------------------------------------


def subset_slot(kind: Kind, subset: tuple[int, ...]) -> int:
    """Which matrix of ``B`` acts on the mean of a tensor of this kind over these canonical axes."""
    return [(k, s) for k in KINDS for s in k.subsets()].index((kind, subset))


def relation_index(own: tuple[Kind, int], other: tuple[Kind, int]) -> int:
    """Which matrix of ``N`` carries a neighbour of axis type ``other`` to an axis of type ``own``."""
    return AXIS_TYPES.index(own) * len(AXIS_TYPES) + AXIS_TYPES.index(other)


def mix(w: Tensor, x: Tensor) -> Tensor:
    """Channel mixing: (C_out, C_in) matrix times every element's (C_in,) vector of x (C_in, ...)."""
    return torch.einsum("oc,c...->o...", w, x)


def neuron_vector(x: Tensor, axis: int) -> Tensor:
    """(C, n): for each neuron j on canonical labelled axis ``axis`` of x (C, *canonical), the mean of
    x over every element whose index on that axis is j."""
    return x.movedim(1 + axis, 1).reshape(x.shape[0], x.shape[1 + axis], -1).mean(2)


def along(v: Tensor, axis: int, dim: int) -> Tensor:
    """(C, n) reshaped to broadcast along canonical labelled axis ``axis`` of a dim-D feature tensor."""
    shape = [1] * dim
    shape[0], shape[1 + axis] = v.shape
    return v.reshape(shape)


def neighbours(group: Group, ti: int, ci: int) -> dict[int, list[tuple[int, int]]]:
    """The (tensor, canonical axis) pairs whose neuron vectors reach canonical labelled axis ``ci`` of
    tensor ``ti``, grouped by the relation (index into ``N``) that carries them.

    Every other tensor axis labelled with the same neuron set is a neighbour, including another
    axis of the same tensor. Under sign flips, the term carries a vector indexed by the set's
    neurons to elements indexed by them: both ends flip alike with the set's own neurons, but a
    flip of any other axis of the source would be averaged away and one of any other axis of the
    target would flip the target alone, so either drops the pair.
    """
    space = group.space
    t = space.tensors[ti]
    ax = t.labelled_axes[ci]
    if group.flips_besides(ti, ax):
        return {}
    out: dict[int, list[tuple[int, int]]] = {}
    for tj, other in enumerate(space.tensors):
        for cj, axj in enumerate(other.labelled_axes):
            if (tj, cj) == (ti, ci) or other.axes[axj] != t.axes[ax] or group.flips_besides(tj, axj):
                continue
            r = relation_index((t.kind, ci), (other.kind, cj))
            out.setdefault(r, []).append((tj, cj))
    return out


def nf_layer(layer: nn.Module, group: Group, xs: Sequence[Tensor], context: Tensor | None) -> list[Tensor]:
    """One NF-layer on canonical features xs[t] (C_in, *canonical shape_t) -> (C_out, *canonical shape_t).

    For tensor t of kind k:

        Y_t = A_k X_t                                         per element
            + sum_S B_{k,S} mean_S(X_t)                       S: nonempty subsets of t's labelled axes
            + sum_a sum_r N_r mean_{(u,b) in r}(V_{u,b})      along labelled axis a (see neighbours)
            + G_k g + E_k ctx_t + bias_k                      per tensor

    where V_{u,b} is tensor u's neuron vector on its axis b and g the mean, over the tensors that
    do not flip, of each tensor's mean. A layer built with ``pooled=False`` has only the per-element
    and per-tensor-context terms and the bias. Under sign flips a term is kept only if it flips
    with the elements it is written to: no mean over a flipping axis, and no per-tensor constant
    (global, context, bias) on a tensor that flips.
    """
    pooled = layer.pooled
    still = [ti for ti in range(len(xs)) if not group.flips(ti)]
    if pooled and still:
        g = torch.stack([xs[ti].reshape(xs[ti].shape[0], -1).mean(1) for ti in still]).mean(0)
    out = []
    for ti, (x, t) in enumerate(zip(xs, group.space.tensors)):
        k = KINDS.index(t.kind)
        y = mix(layer.A[k], x)
        if pooled:
            for subset in t.kind.subsets():
                if any(group.flips_axis(ti, t.labelled_axes[c]) for c in subset):
                    continue
                y = y + mix(layer.B[subset_slot(t.kind, subset)], x.mean([1 + c for c in subset], keepdim=True))
            for ci in range(t.kind.n_labelled):
                for r, members in neighbours(group, ti, ci).items():
                    v = torch.stack([neuron_vector(xs[tj], cj) for tj, cj in members]).mean(0)
                    y = y + along(layer.N[r] @ v, ci, x.dim())
        if not group.flips(ti):
            const = layer.bias[k]
            if context is not None:
                const = const + layer.E[k] @ context[ti]
            if pooled:
                const = const + layer.G[k] @ g
            y = y + const.reshape(-1, *[1] * (x.dim() - 1))
        out.append(y)
    return out


def nfn(rule: nn.Module, group: Group, xs: Sequence[Tensor], context: Tensor) -> list[Tensor]:
    """The rule's NFN: its layers, the context entering the first only, and between layers the
    configured nonlinearity, except tanh on tensors that flip (it must be odd to commute with flips,
    whatever the configured one is)."""
    layers = rule.nfn.layers
    act = ACTIVATIONS[rule.config.activation]
    for n, layer in enumerate(layers):
        xs = nf_layer(layer, group, xs, context if n == 0 else None)
        if n < len(layers) - 1:
            xs = [torch.tanh(x) if group.flips(ti) else act(x) for ti, x in enumerate(xs)]
    return xs


# ---- the step --------------------------------------------------------------------------------------


def learned_update(
    rule: nn.Module,
    spec: WeightSpaceSpec | MonomialSpec,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Statistics],
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
) -> tuple[list[Tensor], list[Statistics], list[bool]]:
    """New parameters, new statistics and per-tensor finite flags after one step of ``rule``.

    Per tensor, with d and c the NFN's two output channels:

        Δ = -lr·α·(u + G·B·tanh(β·d/B))·exp(G·clamp(γ·c, -L, L))  and, decoupled, -lr·α·wd·p

    α, β, γ = the config's initial values times exp(log_alpha), exp(log_beta), exp(log_gamma);
    B = ``max_deviation``, L = ``max_log_scale``. A tensor whose gradient is not finite keeps its
    parameters and statistics. The gate g is 1 where ``gate_floor`` F is 0; else, per element,

        g = e / (e + F·ref),  e = sqrt(v̂ + floor) - sqrt(floor),  ref² = mean of (v̂ + floor)

    the mean taken over every element of every tensor of the weight space (of the tensor's
    component, in a batch of spaces), with v̂ after this step's update. G = g·s, with s = 1 where
    ``snr_gate`` κ is 0; else, per element,

        s = q / (q + κ²),  ρ = |m̂| / (sqrt(v̂ + floor) + eps),  m̂ = m / (1 - d^t)

    m the last momentum (decay d, the last of ``momentum_decays``), t the step count after this
    update (at least 1); q = ρ² without ``snr_margin``; with a margin K,
    q = max(ρ² - K·n, 0) / (1 - n), n = Σ w_i² the sum of the squared weights that m̂ gives the
    t gradients it has seen (w_i = (1 - d)·d^(t - i) / (1 - d^t)), and q = 0 at step 1.

    With ``tensor_log_scale`` T > 0, each tensor's rate lr·α (of its step and its weight decay) is
    multiplied by exp(T·(min(a, 0) + S·max(a, 0))), a = tanh(h(z)), h the rule's ``tensor_head``
    (Linear, ReLU, Linear), z = [log(RMS(m_k)/(1 - d_k^t)/RMS(sqrt(v̂))) for each momentum, log RMS(u), the
    tensor's context]; S = 1 where κ is 0, else q/(q + κ²) with q as above but of the RMS over the
    tensor: ρ = RMS(m̂)/RMS(sqrt(v̂ + floor)). RMS(x) = sqrt(mean(x²) + rms_eps).
    """
    cfg = rule.config
    f = cfg.features
    group = group_of(spec, cfg.sign_flips)
    tensors = group.space.tensors
    lrs = [1.0] * len(params) if lrs is None else lrs
    weight_decays = [0.0] * len(params) if weight_decays is None else weight_decays

    oks, new_states, directions, roots, xs, contexts = [], [], [], [], [], []
    for ti, (p, g, state) in enumerate(zip(params, grads, states)):
        ok = is_finite(g)
        if ok:
            state = updated_statistics(g, state, f.momentum_decays, f.beta2)
        else:
            # Only the gradient channel is zeroed: the other features come from the held statistics
            # (finite, so the pooled terms of other tensors stay finite). The library's docs say
            # such a tensor's features are zeros; its code does this.
            g = torch.zeros_like(g)
        u, root_v = adam_direction(state, f.adam_momentum, f.momentum_decays, f.beta2, f.eps)
        polar_of = state["momenta"][f.adam_momentum] if getattr(f, "polar", False) else None
        x, ctx = features(p, g, state, u, root_v, f.rms_eps, f.time_scales, polar_of)
        if group.flips(ti):
            # Every channel flips with the weights except sqrt(v̂); times sign(u) it does too. The
            # RMS that normalises it was taken before, which differs only where u = 0.
            x = torch.cat([x[:-2], x[-2:-1] * torch.sign(u), x[-1:]])
        oks.append(ok)
        new_states.append(state)
        directions.append(u)
        roots.append(root_v)
        xs.append(to_canonical(x, tensors[ti]))
        contexts.append(ctx)
    ys = nfn(rule, group, xs, torch.stack(contexts))

    alpha = cfg.alpha * rule.log_alpha.exp()
    beta = cfg.beta * rule.log_beta.exp()
    gamma = cfg.gamma * rule.log_gamma.exp()
    bound, limit = cfg.max_deviation, cfg.max_log_scale
    floor = getattr(cfg, "gate_floor", 0.0)
    components = group.space.components or (0,) * len(tensors)
    refs = {}
    for k in set(components):
        members = [ti for ti in range(len(tensors)) if components[ti] == k]
        total = sum(roots[ti].square().sum() for ti in members)
        refs[k] = torch.sqrt(total / max(sum(roots[ti].numel() for ti in members), 1))
    new_params = []
    for ti, (p, u, y, ok, lr, wd) in enumerate(zip(params, directions, ys, oks, lrs, weight_decays)):
        if not ok:
            new_params.append(p)
            continue
        d, c = from_canonical(y, tensors[ti])
        if group.flips(ti):
            c = c * torch.sign(u)  # c flips with the weights; the step size exp(γ·c) must not
        gate = 1.0
        if floor:
            e = roots[ti] - math.sqrt(SQRT_FLOOR)
            gate = e / (e + floor * refs[components[ti]])
        kappa = getattr(cfg, "snr_gate", 0.0)
        if kappa:
            state = new_states[ti]
            m_hat = state["momenta"][-1] / (1 - f.momentum_decays[-1] ** state["step"].clamp(min=1))
            rho = m_hat.abs() / (roots[ti] + f.eps)
            q = rho.square()
            margin = getattr(cfg, "snr_margin", 0.0)
            if margin:
                q = signal_fraction(q, margin, int(state["step"]), f.momentum_decays[-1])
            gate = gate * q / (q + kappa**2)
        step = (u + gate * bound * torch.tanh(beta * d / bound)) * torch.exp(gate * torch.clamp(gamma * c, -limit, limit))
        rate = lr * alpha * tensor_factor(rule, new_states[ti], roots[ti], u, contexts[ti])
        new_params.append(p - rate * wd * p - rate * step)
    return new_params, new_states, oks


def signal_fraction(q: Tensor, margin: float, step: int, decay: float) -> Tensor:
    """max(q - K·n, 0) / (1 - n) for the margin K at step t (0 at step 1), n = Σ w_i² the sum of the
    squared weights (1 - d)·d^(t - i) / (1 - d^t) that the bias-corrected momentum gives the t
    gradients it has seen."""
    t = max(step, 1)
    w = (1 - decay) * decay ** torch.arange(t, dtype=torch.float64) / (1 - decay**t)
    n = float(w.square().sum())
    return (q - margin * n).clamp(min=0) / (1 - n) if t > 1 else torch.zeros_like(q)


def tensor_factor(rule: nn.Module, state: Statistics, root_v: Tensor, u: Tensor, context: Tensor) -> Tensor | float:
    """The per-tensor step factor of a rule with ``tensor_log_scale`` (1.0 without)."""
    cfg = rule.config
    limit = getattr(cfg, "tensor_log_scale", 0.0)
    if not limit:
        return 1.0
    f = cfg.features

    def rms(x: Tensor) -> Tensor:
        return torch.sqrt(x.square().mean() + f.rms_eps)

    t = max(int(state["step"]), 1)
    z = [torch.log(rms(m) / (1 - d**t) / rms(root_v)) for m, d in zip(state["momenta"], f.momentum_decays)]
    z = torch.stack(z + [torch.log(rms(u))])
    z = torch.cat([z, context])
    first, last = rule.tensor_head[0], rule.tensor_head[2]
    a = torch.tanh(last.weight @ torch.relu(first.weight @ z + first.bias) + last.bias)[0]
    s = 1.0
    kappa = getattr(cfg, "snr_gate", 0.0)
    if kappa:
        decay = f.momentum_decays[-1]
        floor = 1e-4 * f.rms_eps  # far below any gradient's mean square, above the recovery's rounding
        q = state["momenta"][-1].square().mean() / (1 - decay**t) ** 2 / (root_v.square().mean() + floor)
        margin = getattr(cfg, "snr_margin", 0.0)
        if margin:
            q = signal_fraction(q, margin, t, decay)
        s = q / (q + kappa**2)
    return torch.exp(limit * (a.clamp(max=0) + s * a.clamp(min=0)))
