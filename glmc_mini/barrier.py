"""Linear interpolation of two models, evaluation, and the loss barrier along the path.

For parameters a, b and lambda on a grid in [0, 1]:

    B(a, b) = max_lambda [ L((1 - lambda) a + lambda b) - ((1 - lambda) L(a) + lambda L(b)) ]

and, for classifiers, the accuracy barrier max_lambda [ (1 - lambda) acc(a) + lambda acc(b) - acc(lambda) ].
"""
import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .checks import check_data, check_pair, positive_int, real
from .models import batch_loss, model_kind


def _model_device(model):
    return next(model.parameters()).device


def evaluate(model, data, device=None):
    """Mean cross-entropy (nats per example, or per predicted token) and accuracy over ``data``.

    Inputs: data, any iterable of batches: (x, y) for classifiers; x [B, T] or (x, _) for
    language models (logits[:, :-1] predict x[:, 1:]). Runs in eval mode under no_grad on the
    model's device (or on ``device``: then a copy of the model is evaluated there, the model itself
    stays where it is). Returns ``{"loss": float, "acc": float | None}`` (acc is None for language
    models); the model's train/eval mode is restored. Each batch is checked first (labels, token
    ids, length: ``checks.check_batch``). Introduced in chapter 0.
    """
    check_data(data, required=True)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {device!r} is not a torch device ({e})") from None
    if device is not None and device != _model_device(model):
        model = copy.deepcopy(model).to(device)
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


def interpolate(model_a, model_b, t, extrapolate=False):
    """A new model (a deep copy of ``model_a``) with every float parameter and buffer (1 - t) A + t B.

    Inputs: two models of one architecture, t a finite number in [0, 1] (outside it only with
    ``extrapolate=True``). Non-float buffers are copied from A; the inputs are left untouched.
    Raises ValueError on a different class, configuration, key set, shape or tying, on other
    devices or dtypes, and on non-finite weights. Introduced in chapter 0.
    """
    t = _check_t(t, extrapolate)
    check_pair(model_a, model_b)
    return _interpolate(model_a, model_b, t)


def _check_t(t, extrapolate):
    t = real(t, "t")
    if not extrapolate and not 0.0 <= t <= 1.0:
        raise ValueError(f"t = {t} is outside [0, 1]: that extrapolates beyond the endpoints; pass "
                         "extrapolate=True if that is what you want")
    return t


def _interpolate(model_a, model_b, t):
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    mixed = {}
    for key, A in state_a.items():
        B = state_b[key]
        mixed[key] = (1 - t) * A + t * B if A.is_floating_point() else A.clone()
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


MAX_POINTS = 1001  # lambdas on the path; each is a full evaluation of the data


def barrier_of(lambdas, values):
    """max_i values[i] - ((1 - lambdas[i]) values[0] + lambdas[i] values[-1]): height above the chord."""
    return max(v - ((1 - lam) * values[0] + lam * values[-1]) for lam, v in zip(lambdas, values))


def barrier(model_a, model_b, data, num_points=11, progress=False):
    """Loss (and accuracy) of the interpolated models on ``data`` for ``num_points`` lambdas in [0, 1].

    Inputs: data as for ``evaluate`` (an iterator is materialised into a list once).
    Returns a BarrierCurve with barrier = max_lambda [L(lambda) - ((1 - lambda) L(0) + lambda L(1))]
    and, for classifiers, barrier_acc = max_lambda [(1 - lambda) acc(0) + lambda acc(1) - acc(lambda)].
    Checks first that A and B are one architecture with finite weights (as :func:`interpolate`) and
    that ``num_points`` >= 2 (both endpoints). Introduced in chapter 0.
    """
    num_points = positive_int(num_points, "num_points", minimum=2, maximum=MAX_POINTS)
    check_data(data, required=True)
    check_pair(model_a, model_b)
    if iter(data) is data:
        data = list(data)
    if not data:
        raise ValueError("barrier got no batches: data is empty")
    lambdas = torch.linspace(0, 1, num_points).tolist()
    results = [evaluate(_interpolate(model_a, model_b, lam), data)
               for lam in tqdm(lambdas, desc="barrier", disable=not progress, leave=False)]
    losses = [r["loss"] for r in results]
    accs = [r["acc"] for r in results] if results[0]["acc"] is not None else None
    barrier_acc = barrier_of(lambdas, [-a for a in accs]) if accs else None
    return BarrierCurve(lambdas, losses, accs, barrier_of(lambdas, losses), barrier_acc, losses[0], losses[-1])
