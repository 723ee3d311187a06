"""nfopt: a learned optimizer for PyTorch built on permutation-equivariant neural functionals.

The rooms: ``weight_space`` (labelled weight spaces and their symmetry groups), ``labelling``
(inferring them from models), ``nn`` (NF-layers and networks on weight space), ``optim`` (the
learned optimizer: features, update rule, ``NFNOptimizer``) and ``io`` (checkpoint files).
"""

from .io import CheckpointError
from .labelling import act_model_, label_model, label_monomial, permute_model_
from .nn import NFN, InvariantPool, NFLayer
from .optim import LearnedUpdate, NFNOptimizer, UpdateConfig
from .weight_space import MonomialSpec, TensorSpec, WeightSpaceSpec, inverse_permutation

__all__ = [
    "CheckpointError",
    "InvariantPool",
    "LearnedUpdate",
    "MonomialSpec",
    "NFLayer",
    "NFN",
    "NFNOptimizer",
    "TensorSpec",
    "UpdateConfig",
    "WeightSpaceSpec",
    "act_model_",
    "inverse_permutation",
    "label_model",
    "label_monomial",
    "permute_model_",
]
