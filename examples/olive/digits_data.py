"""Olive data components for the example: the held-out digits that ship with onnx-lowrank.

Olive imports this file as the workflow's ``user_script`` and finds the components by the names
they are registered under (``digits_holdout``, ``digits_argmax``).
"""

import numpy as np
from olive.data.registry import Registry

from onnx_lowrank.demo import DEMO_HOLDOUT


@Registry.register_dataset()
def digits_holdout(**kwargs):
    """540 real 8x8 digits the demo model never saw in training: ``({"pixels": x}, label)`` pairs."""
    data = np.load(DEMO_HOLDOUT)
    return [({"pixels": x}, int(y)) for x, y in zip(data["pixels"], data["labels"])]


@Registry.register_post_process()
def digits_argmax(output, **kwargs):
    """The predicted class: the largest of the ten logits."""
    return output.argmax(dim=-1)
