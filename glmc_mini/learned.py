"""Learned matching: train the transformation itself on the loss of the merged model.

Free parameters per space are projected onto their class on every forward pass:

- permutation: S [n, n] -> P = hungarian(S) + S - stopgrad(S) (the forward pass uses the hard
  permutation, the gradient flows to S: a straight-through estimator);
- orthogonal (residual, fixing the all-ones direction): Z [d-1, d-1] on the centred subspace ->
  O = Q polar(Z) Q^T + u u^T. polar(Z) is computed by Newton-Schulz iterations
  X <- X (3 I - X^T X) / 2, whose gradient stays finite where an SVD's would not (at an orthogonal
  Z all singular values are equal and the SVD backward divides by their differences); after each
  step Z is retracted onto the orthogonal group;
- invertible (per head): the blocks themselves.

Each step draws lambda ~ U(0.4, 0.6), merges (1 - lambda) A + lambda T(B), and back-propagates
the task loss of the merged model into the projection parameters only (the endpoints are frozen).
Initialised from weight matching: identity initialisation is much worse in Theus et al. (2025).
Introduced in chapter 5.
"""
import torch
import torch.nn as nn
from tqdm import tqdm

from .checks import check_data, positive_int, real, seed_value, split_held_out
from .matching import assignment, polar
from .models import batch_loss, model_kind
from .spaces import build_spec
from .symmetries import Invertible, Orthogonal, Permutation, ones_complement, transform_state


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
    """The free parameters of learned matching, one per space, and their projection."""

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
        if isinstance(T, Orthogonal):
            d = T.O.shape[0]
            self.register_buffer(self._key(name) + "_Q", ones_complement(d, torch.float32).to(T.O.device))
            Q = getattr(self, self._key(name) + "_Q")
            self.register_parameter(self._key(name), nn.Parameter(Q.T @ T.O.float() @ Q))
            self.kinds[name] = "orth"
        elif isinstance(T, Invertible):
            self.register_parameter(self._key(name), nn.Parameter(T.A.detach().float().clone()))
            self.kinds[name] = "inv"
        else:
            P = T.out_matrix() if isinstance(T, Permutation) else Permutation(T.src).out_matrix()
            self.register_parameter(self._key(name), nn.Parameter(P.float().clone()))
            self.kinds[name] = "perm"

    def project(self, hard=False):
        """{space: Transform}: straight-through permutations, polar orthogonal maps, raw blocks."""
        out = {}
        for name in self.names:
            S, kind = getattr(self, self._key(name)), self.kinds[name]
            if kind == "perm":
                P = assignment(S)
                out[name] = P if hard else Permutation(P.perm, P.out_matrix().to(S) + S - S.detach())
            elif kind == "orth":
                Q = getattr(self, self._key(name) + "_Q")
                R = polar(S.detach()).to(S) if hard else newton_schulz_polar(S)
                d = Q.shape[0]
                out[name] = Orthogonal(Q @ R @ Q.T + torch.full((d, d), 1.0 / d, device=S.device, dtype=S.dtype))
            else:
                out[name] = Invertible(S.detach().clone() if hard else S)
        return out

    def param_groups(self, lr, lr_perm):
        """Adam groups: permutation scores at ``lr_perm``, the rest at ``lr``."""
        perm = [getattr(self, self._key(n)) for n in self.names if self.kinds[n] == "perm"]
        rest = [getattr(self, self._key(n)) for n in self.names if self.kinds[n] != "perm"]
        return [g for g in ({"params": perm, "lr": lr_perm}, {"params": rest, "lr": lr}) if g["params"]]

    @torch.no_grad()
    def retract(self):
        """Put each orthogonal parameter back on the group (keeps Newton-Schulz in its basin)."""
        for name in self.names:
            if self.kinds[name] == "orth":
                S = getattr(self, self._key(name))
                S.copy_(polar(S).to(S))


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


def learned_matching(model_a, model_b, data, init, steps=200, lr=1e-2, lr_perm=0.05, seed=0,
                     lam_range=(0.4, 0.6), select_batches=4, progress=True):
    """Refine ``init`` (weight matching's transforms) on the loss of the merged model.

    Inputs: model_a, model_b of one class (canonical stock models, or circuit models); data, any
    iterable of batches, iterated once (``checks.split_held_out``): its first ``select_batches``
    batches are held out, the others are trained on (replayed once the pass ends); init
    {space: Transform}. Only the projection parameters train: orthogonal and invertible ones with
    Adam at ``lr``; permutation scores start one-hot, so a different assignment needs a score to
    move by about 1: they use ``lr_perm``. Stochastic steps can wander and fit the batches they
    see, so the returned solution is the best, by the midpoint loss (lambda = 1/2) on the held-out
    batches, among the start and the iterates checked every ``steps // 10`` steps: never worse
    than ``init`` on those batches. The models' train/eval modes are left as they were (the loss
    is computed in eval mode). Returns (hard transforms {space: Transform}, list of per-step losses).
    """
    steps, select_batches = positive_int(steps, "steps"), positive_int(select_batches, "select_batches")
    lr, lr_perm = real(lr, "lr", low=0.0, open_low=True), real(lr_perm, "lr_perm", low=0.0, open_low=True)
    lo, hi = (real(v, "lam_range", 0.0, 1.0) for v in lam_range)
    if lo > hi:
        raise ValueError(f"lam_range must be (low, high) with low <= high, got {tuple(lam_range)}")
    spec = build_spec(model_a)
    device = next(model_a.parameters()).device
    A = {k: v.detach() for k, v in model_a.state_dict().items()}
    B = {k: v.detach() for k, v in model_b.state_dict().items()}
    proj = Projections(dict(init), spec).to(device)
    opt = torch.optim.Adam(proj.param_groups(lr, lr_perm))
    lossof, gen = _LossOf(model_a), torch.Generator().manual_seed(seed_value(seed))
    held, batches = split_held_out(check_data(data), select_batches)
    with eval_mode(model_a):
        best = _score(lossof, A, B, spec, proj.project(hard=True), held)
        losses, every = [], max(1, steps // 10)
        for step in tqdm(range(1, steps + 1), desc="learned matching", disable=not progress, leave=False):
            lam = lo + (hi - lo) * torch.rand((), generator=gen).item()
            loss = merged_loss(lossof, A, transform_state(B, spec, proj.project(), check=False), lam, next(batches))
            opt.zero_grad()
            loss.backward()
            opt.step()
            proj.retract()
            losses.append(loss.item())
            if step % every == 0 or step == steps:
                best = min(best, _score(lossof, A, B, spec, proj.project(hard=True), held), key=lambda b: b[0])
    return best[1], losses


@torch.no_grad()
def _score(lossof, A, B, spec, T, held):
    """(midpoint loss on the held batches, T)."""
    TB = transform_state(B, spec, T, check=False)
    return sum(merged_loss(lossof, A, TB, 0.5, b).item() for b in held) / max(1, len(held)), T
