"""Device choice and seeding: one helper each, so no chapter pastes its own setup cell."""
import random

import numpy as np
import torch

_ANNOUNCED = False


def get_device(verbose=True):
    """CUDA when available, else CPU; says which once per process (on CPU, how to get a Colab GPU).

    Introduced in chapter 0.
    """
    global _ANNOUNCED
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if verbose and not _ANNOUNCED:
        _ANNOUNCED = True
        if device.type == "cuda":
            print(f"device: cuda ({torch.cuda.get_device_name(device)})")
        else:
            print("device: cpu  (for a GPU on Colab: Runtime > Change runtime type > GPU)")
    return device


def seed_everything(seed):
    """Seed Python's ``random``, NumPy and torch (CPU and every CUDA device) with ``seed``.

    Introduced in chapter 0.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def to_model_device(x, model):
    """``x`` (a tensor, or a tuple / list / dict of them) on ``model``'s device; floating tensors also
    take the model's floating dtype. Chapters use it for every tensor they mix with a model's own
    (inputs, masks, constants), so the same cell runs on a CPU and on a GPU.

    Introduced in chapter 1.
    """
    param = next(model.parameters())
    if isinstance(x, (tuple, list)):
        return type(x)(to_model_device(t, model) for t in x)
    if isinstance(x, dict):
        return {k: to_model_device(t, model) for k, t in x.items()}
    if not torch.is_tensor(x):
        return x
    return x.to(param.device, dtype=param.dtype if x.is_floating_point() else None)
