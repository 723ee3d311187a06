"""What a learned optimizer is meta-trained and evaluated on.

``data``: the datasets (bundled with scikit-learn, or generated). ``models``: the MLPs and CNNs
that train on them. ``task``: a task's config and the built task (seeded init, batches, losses).
``distribution``: the sampled task distribution, its train / held-out split and ``HELD_OUT``.
"""

from .distribution import HELD_OUT, HELD_OUT_SIGNATURES, held_out_properties, sample_task_config
from .task import Params, Task, TaskConfig

__all__ = ["HELD_OUT", "HELD_OUT_SIGNATURES", "Params", "Task", "TaskConfig", "held_out_properties", "sample_task_config"]
