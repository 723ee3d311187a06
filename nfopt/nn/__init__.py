"""Equivariant networks on weight space.

``plan``: what a layer needs to know about a weight space, computed once per spec.
``layer``: the shared-weight NF-layer. ``nfn``: stacks of them and an invariant pool.
``reference``: the seed paper's NP and HNP layers for fixed MLP and CNN weight spaces.
"""

from .layer import NFLayer
from .nfn import NFN, InvariantPool
from .reference import HNPLinear, HNPPool, NetworkShape, NPLinear, NPPool, WeightSpaceBatch

__all__ = ["HNPLinear", "HNPPool", "InvariantPool", "NFLayer", "NFN", "NPLinear", "NPPool", "NetworkShape", "WeightSpaceBatch"]
