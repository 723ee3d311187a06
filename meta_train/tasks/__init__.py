"""What a learned optimizer is meta-trained and evaluated on.

``data``: the datasets (bundled with scikit-learn, generated, or standard-library docstrings).
``models``: the networks that train on them (MLPs, CNNs, residual MLPs, autoencoders,
transformers, LSTMs, GRUs). ``task``: a task's config and the built task (seeded init, batches, losses).
``distribution``: the sampled task distributions (``v1``, ``v2``), their train / held-out split
and ``HELD_OUT``.
"""

from .distribution import (
    DISTRIBUTIONS, HELD_OUT, HELD_OUT_SIGNATURES, HELD_OUT_V2, held_out_properties, sample_task_config
)
from .task import LABELLINGS, Params, Task, TaskConfig

__all__ = ["DISTRIBUTIONS", "HELD_OUT", "HELD_OUT_SIGNATURES", "HELD_OUT_V2", "LABELLINGS", "Params", "Task",
           "TaskConfig", "held_out_properties", "sample_task_config"]
