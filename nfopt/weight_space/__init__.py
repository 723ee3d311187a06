"""Weight-space structure: neuron sets, tensor kinds, and the groups that act on them.

``spec``: which axes of which tensors move together under neuron permutations.
``monomial``: sign flips and positive scalings of neurons on top of the permutations.
"""

from .monomial import MonomialElement, MonomialSpec, as_monomial, batch, default_exponents, sign_scale_invariants
from .spec import AXIS_TYPES, KINDS, MAX_LABELLED_AXES, Kind, Label, Permutation, TensorSpec, WeightSpaceSpec, inverse_permutation

__all__ = [
    "AXIS_TYPES",
    "KINDS",
    "MAX_LABELLED_AXES",
    "Kind",
    "Label",
    "MonomialElement",
    "MonomialSpec",
    "Permutation",
    "TensorSpec",
    "WeightSpaceSpec",
    "as_monomial",
    "batch",
    "default_exponents",
    "inverse_permutation",
    "sign_scale_invariants",
]
