"""Counting equivariant linear maps: the orbit count against brute force and the seed's HNP layer."""

from __future__ import annotations

import pytest
import torch

from benchmarks.monomial_params import equivariant_dimension, hidden_mlp_spec, rows
from nfopt.weight_space import MonomialSpec


def brute_force_dimension(spec: MonomialSpec, trials: int = 12) -> int:
    """Dimension of {(L, c): g L = L g, g c = c} over random group elements, by linear algebra."""
    shapes = [t.shape for t in spec.space.tensors]
    sizes = [torch.Size(s).numel() for s in shapes]
    dim = sum(sizes)

    def representation(g) -> torch.Tensor:
        columns = []
        for k in range(dim):
            flat = torch.zeros(dim, dtype=torch.float64)
            flat[k] = 1
            parts = [p.reshape(s) for p, s in zip(flat.split(sizes), shapes)]
            columns.append(torch.cat([y.reshape(-1) for y in spec.act(parts, g)]))
        return torch.stack(columns, dim=1)

    eye = torch.eye(dim, dtype=torch.float64)
    rows_ = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(trials):
        r = representation(spec.random_element(gen, log10_scale=1.0))
        # vec(R L R^-1 - L) and R c - c, as linear maps of (vec L, c)
        lin = torch.kron(r, torch.linalg.inv(r).T) - torch.eye(dim * dim, dtype=torch.float64)
        rows_.append(torch.block_diag(lin, r - eye))
    system = torch.cat(rows_)
    return dim * dim + dim - int(torch.linalg.matrix_rank(system))


@pytest.mark.parametrize("symmetry", ["perm", "sign", "scale"])
@pytest.mark.parametrize("widths", [[2, 2, 2], [2, 3, 2, 2], [1, 2, 2, 1]])
def test_orbit_count_matches_brute_force(widths, symmetry):
    spec = hidden_mlp_spec(widths, symmetry)
    assert equivariant_dimension(spec) == brute_force_dimension(spec)


def test_signs_and_scales_make_growth_in_depth_linear():
    """The permutation count equals the seed's HNP layer; with signs or scales it grows by a constant."""
    table = rows([2, 3, 4, 5, 6], width=8, n_in=5, n_out=3)
    assert all(r["max_perm"] == r["hnp"] for r in table)
    for g in ("sign", "scale"):
        steps = [b[f"max_{g}"] - a[f"max_{g}"] for a, b in zip(table[1:], table[2:])]
        assert len(set(steps)) == 1, steps
        assert all(r[f"max_{g}"] < r["max_perm"] for r in table)
    perm_steps = [b["max_perm"] - a["max_perm"] for a, b in zip(table[1:], table[2:])]
    assert all(y > x for x, y in zip(perm_steps, perm_steps[1:]))  # quadratic: the increments grow
    assert all(r["shared_sign"] < r["shared_perm"] and r["shared_scale"] < r["shared_perm"] for r in table)
