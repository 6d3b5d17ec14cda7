"""Learned matching: train the transformation itself on the loss of the merged model.

Free parameters per space are projected onto their class on every forward pass (each class's
``to_parameter`` / ``from_parameter`` in ``symmetries``):

- permutation: S [n, n] -> P = hungarian(S) + S - stopgrad(S) (the forward pass uses the hard
  permutation, the gradient flows to S: a straight-through estimator); in a block-structured space
  (query heads within their key-value group) the assignment stays inside the blocks;
- orthogonal (residual): Z on the subspace the map is free on -> O = Q polar(Z) Q^T (+ u u^T where
  LayerNorms make O fix the all-ones direction: Q a basis of 1-perp; Q = I under RMSNorms).
  polar(Z) is computed by Newton-Schulz iterations X <- X (3 I - X^T X) / 2, whose gradient stays
  finite where an SVD's would not (at an orthogonal Z all singular values are equal and the SVD
  backward divides by their differences); after each step Z is retracted onto the group;
- invertible (per head): the blocks themselves; under rotary embeddings a log-scale and an angle
  per frequency pair (``symmetries.Rotary``).

Each step draws lambda ~ U(0.4, 0.6), merges (1 - lambda) A + lambda T(B), and back-propagates
the task loss of the merged model into the projection parameters only (the endpoints are frozen),
with Adam at learning rates held constant or decayed to zero by a cosine (``schedule``).
Initialised from weight matching: identity initialisation is much worse in Theus et al. (2025).
Introduced in chapter 5.
"""
import math

import torch
import torch.nn as nn
from tqdm import tqdm

from .checks import check_data, choice, positive_int, real, seed_value, split_held_out
from .models import batch_loss, model_kind
from .spaces import build_spec
from .symmetries import CLASSES, Orthogonal, Permutation, transform_state


def newton_schulz_polar(Z, iters=12):
    """The orthogonal polar factor of Z by Newton-Schulz: X_0 = sqrt(n) Z / ||Z||_F (unit RMS
    singular value; the iteration converges for singular values in (0, sqrt 3), and learned
    matching keeps Z near the group), then X <- 1.5 X - 0.5 X X^T X."""
    X = Z * (Z.shape[0] ** 0.5) / Z.norm()
    for _ in range(iters):
        X = 1.5 * X - 0.5 * X @ X.T @ X
    return X


class _LossOf(nn.Module):
    """Wraps a model so that ``torch.func.functional_call`` returns the mean loss of a batch."""

    def __init__(self, model):
        super().__init__()
        self.model, self.kind = model, model_kind(model)

    def forward(self, batch):
        loss, n, _ = batch_loss(self.model, batch, self.kind)
        return loss / n


class Projections(nn.Module):
    """The free parameters of learned matching, one set per space, and their projection onto the
    space's class (the class's ``to_parameter`` / ``from_parameter``, module docstring)."""

    def __init__(self, init, spec):
        super().__init__()
        self.spec = spec
        self.names = sorted(init)
        self.kinds = {}
        for name in self.names:
            self._add(name, init[name])

    def _key(self, name):
        return name.replace(".", "_")

    def _add(self, name, T):
        cls = CLASSES["perm" if T.cls == "semi" else T.cls]
        for suffix, tensor in cls.to_parameter(T, self.spec.spaces[name]).items():
            if suffix:
                self.register_buffer(self._key(name) + suffix, tensor)
            else:
                self.register_parameter(self._key(name), nn.Parameter(tensor))
        self.kinds[name] = cls

    def _tensors(self, name):
        key = self._key(name)
        return {n[len(key):]: t for n, t in list(self.named_parameters()) + list(self.named_buffers())
                if n == key or (n.startswith(key + "_") and n[len(key) + 1:] in ("Q",))}

    def project(self, hard=False):
        """{space: Transform}: straight-through permutations, polar orthogonal maps, raw blocks."""
        return {name: self.kinds[name].from_parameter(self._tensors(name), self.spec.spaces[name], hard)
                for name in self.names}

    def param_groups(self, lr, lr_perm):
        """Adam groups: permutation scores at ``lr_perm``, the rest at ``lr``."""
        perm = [getattr(self, self._key(n)) for n in self.names if self.kinds[n] is Permutation]
        rest = [getattr(self, self._key(n)) for n in self.names if self.kinds[n] is not Permutation]
        return [g for g in ({"params": perm, "lr": lr_perm}, {"params": rest, "lr": lr}) if g["params"]]

    @torch.no_grad()
    def retract(self):
        """Put each orthogonal parameter back on the group (keeps Newton-Schulz in its basin)."""
        for name in self.names:
            if self.kinds[name] is Orthogonal:
                Orthogonal.retract(self._tensors(name))


class eval_mode:
    """``with eval_mode(model):`` the model in eval mode inside, its own mode restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def merged_loss(lossof, A, TB, lam, batch):
    """Task loss of the merged parameters (1 - lam) A + lam T(B) on one batch (differentiable in TB)."""
    merged = {"model." + k: (1 - lam) * A[k] + lam * TB[k] if A[k].is_floating_point() else A[k] for k in A}
    return torch.func.functional_call(lossof, merged, (batch,))


SCHEDULES = ("constant", "cosine")


def learning_rate_factor(schedule, step, steps):
    """The factor on both learning rates before optimiser step ``step`` (0-based) of ``steps``:
    1 throughout ("constant"), or 1/2 (1 + cos(pi step / steps)) ("cosine": from 1 down to near 0,
    so the last steps settle instead of hopping between the assignments a fixed rate keeps reaching)."""
    return 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * step / steps))


def learned_matching(model_a, model_b, data, init, steps=200, lr=1e-2, lr_perm=0.05, seed=0,
                     lam_range=(0.4, 0.6), select_batches=4, progress=True, distributed=None,
                     schedule="constant"):
    """Refine ``init`` (weight matching's transforms) on the loss of the merged model.

    Inputs: model_a, model_b of one class (canonical stock models, or circuit models); data, any
    iterable of batches, iterated once (``checks.split_held_out``): its first ``select_batches``
    batches are held out, the others are trained on (replayed once the pass ends); init
    {space: Transform}. Only the projection parameters train: orthogonal and invertible ones with
    Adam at ``lr``; permutation scores start one-hot, so a different assignment needs a score to
    move by about 1: they use ``lr_perm``. Stochastic steps can wander and fit the batches they
    see, so the returned solution is the best, by the midpoint loss (lambda = 1/2) on the held-out
    batches, among the start and the iterates checked every ``steps // 10`` steps: never worse
    than ``init`` on those batches. ``schedule`` scales both learning rates per step
    (:func:`learning_rate_factor`: "constant", or "cosine" decay to zero over ``steps``). The
    models' train/eval modes are left as they were (the loss is computed in eval mode). Returns
    (hard transforms {space: Transform}, list of per-step losses).

    Data-parallel across processes (``glmc_mini.distributed``) when ``distributed`` is True, or None
    (the default) and a torch.distributed process group is initialised: every process passes the
    same models and the same global batches; each computes the loss on its rows of every batch,
    the gradients and held-out losses are summed across processes, every process returns the same
    transforms, and only process 0 shows progress. ``distributed=False`` ignores any group.
    """
    from . import distributed as dp
    steps, select_batches = positive_int(steps, "steps"), positive_int(select_batches, "select_batches")
    lr, lr_perm = real(lr, "lr", low=0.0, open_low=True), real(lr_perm, "lr_perm", low=0.0, open_low=True)
    schedule = choice(schedule, "schedule", SCHEDULES)
    lo, hi = (real(v, "lam_range", 0.0, 1.0) for v in lam_range)
    if lo > hi:
        raise ValueError(f"lam_range must be (low, high) with low <= high, got {tuple(lam_range)}")
    rank, size = dp.world(distributed)
    spec = build_spec(model_a)
    device = next(model_a.parameters()).device
    A = {k: v.detach() for k, v in model_a.state_dict().items()}
    B = {k: v.detach() for k, v in model_b.state_dict().items()}
    proj = Projections(dict(init), spec).to(device)
    opt = torch.optim.Adam(proj.param_groups(lr, lr_perm))
    base = [g["lr"] for g in opt.param_groups]
    lossof, gen = _LossOf(model_a), torch.Generator().manual_seed(seed_value(seed))  # same lambdas on every rank
    held, batches = split_held_out(check_data(data), select_batches)

    def score():
        if size > 1:
            dp.broadcast_module(proj)  # every process continues from process 0's parameters
        return _score(lossof, A, B, spec, proj.project(hard=True), held, rank, size, device)

    with eval_mode(model_a):
        best = score()
        losses, every = [], max(1, steps // 10)
        for step in tqdm(range(1, steps + 1), desc="learned matching", disable=not progress or rank != 0,
                         leave=False):
            lam = lo + (hi - lo) * torch.rand((), generator=gen).item()
            batch, share = dp.shard(next(batches), rank, size)
            loss = merged_loss(lossof, A, transform_state(B, spec, proj.project(), check=False), lam, batch)
            if size > 1:
                loss = loss * share  # summed over processes: the mean over the global batch
            opt.zero_grad()
            loss.backward()
            factor = learning_rate_factor(schedule, step - 1, steps)
            for group, rate in zip(opt.param_groups, base):
                group["lr"] = rate * factor
            if size > 1:
                dp.sum_grads(proj.parameters())
            opt.step()
            proj.retract()
            losses.append(loss.item() if size == 1 else dp.sum_values([loss.item()], device)[0])
            if step % every == 0 or step == steps:
                best = min(best, score(), key=lambda b: b[0])
    return best[1], losses


@torch.no_grad()
def _score(lossof, A, B, spec, T, held, rank=0, size=1, device=None):
    """(midpoint loss on the held batches, T). Across ``size`` processes each computes its rows of
    every batch (``distributed.shard``) and the weighted losses are summed: the same on every process."""
    TB = transform_state(B, spec, T, check=False)
    if size == 1:
        return sum(merged_loss(lossof, A, TB, 0.5, b).item() for b in held) / max(1, len(held)), T
    from . import distributed as dp
    parts = []
    for b in held:
        local, share = dp.shard(b, rank, size)
        parts.append(merged_loss(lossof, A, TB, 0.5, local).item() * share)
    return sum(dp.sum_values(parts, device)) / max(1, len(held)), T
