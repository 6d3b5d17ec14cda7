"""Linear interpolation of two models, evaluation, and the loss barrier along the path.

For parameters a, b and lambda on a grid in [0, 1]:

    B(a, b) = max_lambda [ L((1 - lambda) a + lambda b) - ((1 - lambda) L(a) + lambda L(b)) ]

and, for classifiers, the accuracy barrier max_lambda [ (1 - lambda) acc(a) + lambda acc(b) - acc(lambda) ].
"""
import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .models import batch_loss, model_kind


def _model_device(model):
    return next(model.parameters()).device


def evaluate(model, data, device=None):
    """Mean cross-entropy (nats per example, or per predicted token) and accuracy over ``data``.

    Inputs: data, any iterable of batches: (x, y) for classifiers; x [B, T] or (x, _) for
    language models (logits[:, :-1] predict x[:, 1:]). Runs in eval mode under no_grad on the
    model's device (or ``device``: then the model is moved there). Returns
    ``{"loss": float, "acc": float | None}`` (acc is None for language models); the model's
    train/eval mode is restored. Introduced in chapter 0.
    """
    if device is not None:
        model.to(device)
    kind, was_training = model_kind(model), model.training
    total, count, correct = 0.0, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in data:
                loss_sum, n, right = batch_loss(model, batch, kind)
                total, count = total + loss_sum.item(), count + n
                correct += 0 if right is None else right.item()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate got no batches")
    return {"loss": total / count, "acc": correct / count if kind == "classification" else None}


def _tied_groups(model):
    """Names of parameters that share storage (e.g. GPT-2's tied embeddings), as a set of tuples."""
    groups = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {tuple(sorted(names)) for names in groups.values() if len(names) > 1}


def _check_compatible(model_a, model_b, state_a, state_b):
    """ValueError naming the first difference in class, keys, shapes or parameter tying."""
    if type(model_a) is not type(model_b):
        raise ValueError(f"cannot interpolate a {type(model_a).__name__} with a {type(model_b).__name__}")
    for key in list(state_a) + [k for k in state_b if k not in state_a]:
        if key not in state_a or key not in state_b:
            raise ValueError(f"parameter {key!r} is in only one of the two models")
        if state_a[key].shape != state_b[key].shape:
            raise ValueError(f"shape mismatch at {key!r}: {tuple(state_a[key].shape)} vs {tuple(state_b[key].shape)}")
    if _tied_groups(model_a) != _tied_groups(model_b):
        raise ValueError(f"parameter tying differs: {_tied_groups(model_a)} vs {_tied_groups(model_b)}")


def interpolate(model_a, model_b, t):
    """A new model (a deep copy of ``model_a``) with every float parameter and buffer (1 - t) A + t B.

    Non-float buffers are copied from A; the inputs are left untouched. Raises ValueError on a
    different class, key set, shape or tying. Introduced in chapter 0.
    """
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    _check_compatible(model_a, model_b, state_a, state_b)
    mixed = {}
    for key, A in state_a.items():
        B = state_b[key].to(A.device)
        mixed[key] = (1 - t) * A + t * B.to(A.dtype) if A.is_floating_point() else A.clone()
    model = copy.deepcopy(model_a)
    model.load_state_dict(mixed)
    return model


@dataclass
class BarrierCurve:
    """Loss (and accuracy) along the linear path lambda -> (1 - lambda) A + lambda B."""
    lambdas: list        # grid of lambda in [0, 1]
    losses: list         # L(lambda), mean cross-entropy in nats
    accs: list           # accuracy at each lambda (classifiers), else None
    barrier: float       # max_lambda L(lambda) - ((1 - lambda) L(0) + lambda L(1)), nats
    barrier_acc: float   # max_lambda ((1 - lambda) acc(0) + lambda acc(1)) - acc(lambda), or None
    loss_a: float        # L(0)
    loss_b: float        # L(1)


def barrier_of(lambdas, values):
    """max_i values[i] - ((1 - lambdas[i]) values[0] + lambdas[i] values[-1]): height above the chord."""
    return max(v - ((1 - lam) * values[0] + lam * values[-1]) for lam, v in zip(lambdas, values))


def barrier(model_a, model_b, data, num_points=11, progress=False):
    """Loss (and accuracy) of the interpolated models on ``data`` for ``num_points`` lambdas in [0, 1].

    Inputs: data as for ``evaluate`` (an iterator is materialised into a list once).
    Returns a BarrierCurve with barrier = max_lambda [L(lambda) - ((1 - lambda) L(0) + lambda L(1))]
    and, for classifiers, barrier_acc = max_lambda [(1 - lambda) acc(0) + lambda acc(1) - acc(lambda)].
    Introduced in chapter 0.
    """
    if iter(data) is data:
        data = list(data)
    lambdas = torch.linspace(0, 1, num_points).tolist()
    results = [evaluate(interpolate(model_a, model_b, lam), data)
               for lam in tqdm(lambdas, desc="barrier", disable=not progress, leave=False)]
    losses = [r["loss"] for r in results]
    accs = [r["acc"] for r in results] if results[0]["acc"] is not None else None
    barrier_acc = barrier_of(lambdas, [-a for a in accs]) if accs else None
    return BarrierCurve(lambdas, losses, accs, barrier_of(lambdas, losses), barrier_acc, losses[0], losses[-1])
