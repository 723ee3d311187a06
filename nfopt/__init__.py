"""nfopt: a learned optimizer for PyTorch built on permutation-equivariant neural functionals."""

from .nf_layer import NFLayer
from .nfn import NFN, InvariantPool
from .optimizer import NFNOptimizer
from .weight_space import Kind, TensorSpec, WeightSpaceSpec, inverse_permutation

__all__ = ["NFNOptimizer", "NFLayer", "NFN", "InvariantPool", "Kind", "TensorSpec", "WeightSpaceSpec", "inverse_permutation"]
