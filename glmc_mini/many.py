"""Several models at once: universe matching, learned refinement, interpolation over the simplex.

Two models are aligned by moving B onto A. With K models there is no privileged A, so every model
is moved onto a common *reference* that is itself their average (Theus et al. 2025,
chapter 5):

    universe matching    C_k = canonical(model_k);  R = C_0
                         repeat: T_k = weight_matching(R, C_k) for every k;  R = (1/K) sum_k T_k(C_k)
                         until the transforms stop changing.
    learned refinement   free projection parameters per model and space (as in learned matching,
                         model 0 fixed as the anchor); each step draws w ~ Dirichlet(c 1_K) and
                         minimises the task loss of sum_k w_k T_k(C_k); keeps the best iterate by
                         the loss at the centre (w = 1/K) on a few batches.

Every aligned model computes the same function as its original; their mixtures
``sum_k w_k theta_k`` (:func:`interpolate_many`) are stock models again, so the loss can be mapped
over the whole simplex (:func:`simplex_grid`, :func:`simplex_losses`, ``gm.plot_simplex``).
Introduced in chapter 5.
"""
import copy
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .align import _check_first_batch, _validate, check_pair, check_symmetries
from .barrier import evaluate
from .checks import check_data, optional_positive_int, positive_int, real, seed_value
from .checks import check_pair as _check_pair
from .canonical import canonicalize
from .spaces import build_spec
from .symmetries import apply_transforms, transform_state


@dataclass
class ManyResult:
    """What ``align_many`` found: the K models in one basin, their transforms and the reference."""
    models: list             # canonical model k moved onto the reference (same function as model k)
    transforms: list         # {space: Transform} per model, taking canonical model k to models[k]
    reference: object        # the plain average of ``models`` (a stock model)
    method: str
    symmetries: tuple
    seconds: float
    history: list = field(default_factory=list)  # universe matching: largest transform change per round
    losses: list = field(default_factory=list)   # learned refinement: mixture loss per step


def interpolate_many(models, weights):
    """A new model (a copy of ``models[0]``) with every float parameter and buffer sum_k w_k theta_k.

    Inputs: models, K models of one class and shape; weights [K], non-negative, summing to 1
    (else ValueError). Non-float buffers are copied from models[0]; the inputs are untouched.
    Introduced in chapter 5.
    """
    models = list(models)
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if not models or w.numel() != len(models):
        raise ValueError(f"need one weight per model: {w.numel()} weights for {len(models)} models")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"mixture weights must be non-negative, got {w.tolist()}")
    if abs(float(w.sum()) - 1.0) > 1e-6:
        raise ValueError(f"mixture weights must sum to 1, got {float(w.sum()):.6g}")
    for model in models[1:]:
        _check_pair(models[0], model)
    states = [m.state_dict() for m in models]
    mixed = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            mixed[key] = sum(float(wk) * s[key].to(first.device, first.dtype) for wk, s in zip(w, states))
        else:
            mixed[key] = first.clone()
    model = copy.deepcopy(models[0])
    model.load_state_dict(mixed)
    return model


def simplex_grid(n):
    """Barycentric points [N, 3] of a triangular grid with ``n`` points per edge, N = n (n + 1) / 2.

    Rows (i, j, n - 1 - i - j) / (n - 1) for i, j >= 0: the weights of models A, B, C; corners
    and edge midpoints (n odd) are on the grid. Introduced in chapter 5.
    """
    n = positive_int(n, "n (points per edge of the simplex grid)", minimum=2, maximum=101)
    rows = [(i, j, n - 1 - i - j) for i in range(n) for j in range(n - i)]
    return torch.tensor(rows, dtype=torch.float64).div(n - 1).float()


def simplex_losses(models, data, n=7, progress=False):
    """Loss of the mixture w_A A + w_B B + w_C C at every point of ``simplex_grid(n)``.

    Inputs: three models of one class (aligned, e.g. ``align_many(...).models``); data as for
    ``gm.evaluate``. Returns (points [N, 3], losses [N]) for ``gm.plot_simplex(points, losses)``.
    """
    if len(models) != 3:
        raise ValueError(f"the simplex plot takes three models, got {len(models)}")
    check_data(data, required=True)
    if iter(data) is data:
        data = list(data)
    points = simplex_grid(n)
    losses = [evaluate(interpolate_many(models, w.tolist()), data)["loss"]
              for w in tqdm(points, desc="simplex", disable=not progress, leave=False)]
    return points, torch.tensor(losses)


# --------------------------------------------------------------------------- universe matching

def _change(old, new):
    """The largest difference between two solutions: units changed, ||dO||_F or relative ||dA||_F."""
    from .gap import compare_solutions
    keys = ("changed", "fro", "rel")
    return max((max(c[k] for k in keys if k in c) for c in compare_solutions(old, new).values()), default=0.0)


def _universe(canon, symmetries, seed, iters, tol, progress):
    """Universe matching on canonical models: (transforms per model, aligned models, change per round)."""
    from .matching import weight_matching
    K, reference = len(canon), canon[0]
    transforms, history = [None] * K, []
    for _ in tqdm(range(iters), desc="universe matching", disable=not progress, leave=False):
        new = [weight_matching(reference, C, symmetries=symmetries, seed=seed + k, init=transforms[k])[0]
               for k, C in enumerate(canon)]
        aligned = [apply_transforms(C, T) for C, T in zip(canon, new)]
        change = float("inf") if transforms[0] is None else max(_change(a, b) for a, b in zip(transforms, new))
        transforms, reference = new, interpolate_many(aligned, [1.0 / K] * K)
        history.append(change)
        if change <= tol:
            break
    return transforms, aligned, history


# --------------------------------------------------------------------------- learned refinement

def _learned_many(canon, init, data, steps, lr, lr_perm, seed, concentration, select_batches, progress):
    """Refine transforms 1..K-1 (model 0 is the anchor) on the loss of Dirichlet mixtures.

    As in two-model learned matching, permutation scores get their own learning rate ``lr_perm``
    and the returned solution is the best, by the loss of the equal-weight mixture (the simplex
    centre) on the first ``select_batches`` batches of ``data``, held out from training
    (``checks.split_held_out``), among the start and the iterates checked every ``steps // 10``
    steps: never worse than universe matching on those batches.
    """
    from .checks import split_held_out
    from .learned import Projections, _LossOf, eval_mode
    K, spec = len(canon), build_spec(canon[0])
    device = next(canon[0].parameters()).device
    states = [{k: v.detach() for k, v in C.state_dict().items()} for C in canon]
    anchor = transform_state(states[0], spec, init[0], check=False)
    projs = [Projections(init[k], spec).to(device) for k in range(1, K)]
    opt = torch.optim.Adam([g for proj in projs for g in proj.param_groups(lr, lr_perm)])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        W = torch.distributions.Dirichlet(concentration * torch.ones(K)).sample((steps,))  # [steps, K]
    lossof, losses = _LossOf(canon[0]), []
    held, batches = split_held_out(data, select_batches)

    def mixture_loss(w, transforms, batch):
        moved = [anchor] + [transform_state(states[k], spec, transforms[k - 1], check=False) for k in range(1, K)]
        merged = {"model." + key: sum(wk * m[key] for wk, m in zip(w, moved)) if x.is_floating_point() else x
                  for key, x in states[0].items()}
        return torch.func.functional_call(lossof, merged, (batch,))

    @torch.no_grad()
    def score():
        hard = [proj.project(hard=True) for proj in projs]
        centre = [1.0 / K] * K
        return sum(mixture_loss(centre, hard, b).item() for b in held) / max(1, len(held)), hard

    with eval_mode(canon[0]):
        best, every = score(), max(1, steps // 10)
        for step, w in enumerate(tqdm(W.tolist(), desc="learned universe", disable=not progress, leave=False), 1):
            loss = mixture_loss(w, [proj.project() for proj in projs], next(batches))
            opt.zero_grad()
            loss.backward()
            opt.step()
            for proj in projs:
                proj.retract()
            losses.append(loss.item())
            if step % every == 0 or step == steps:
                best = min(best, score(), key=lambda b: b[0])
    return [init[0]] + best[1], losses


def align_many(models, method="weight", symmetries=("perm", "orth", "inv"), data=None, steps=None, seed=0,
               iters=5, concentration=1.0, progress=True, lr=None, lr_perm=0.05, tol=1e-4, select_batches=4):
    """Bring K >= 2 models into one basin: universe matching, optionally refined by learned matching.

    Inputs: models of one architecture (stock MLP / timm ViT / HF GPT-2), untouched; method
    "weight" (universe matching) or "learned" (then ``steps`` of Dirichlet-mixture refinement on
    ``data``, default 200, learning rate ``lr``, default 1e-2, ``lr_perm`` for permutation scores,
    Dirichlet ``concentration``; the best iterate by the centre loss on ``select_batches`` batches
    is kept);
    iters, universe rounds (stops early once no transform changes by more than ``tol``).
    Returns a :class:`ManyResult`. Introduced in chapter 5.
    """
    if method not in ("weight", "learned"):
        raise ValueError(f"unknown method {method!r} for several models; choose 'weight' or 'learned'")
    symmetries = _validate(method, symmetries, data, "stock", steps, seed, lr)
    seed, steps = seed_value(seed), optional_positive_int(steps, "steps")
    if isinstance(models, torch.nn.Module):
        raise TypeError("align_many takes a list of models, got a single model")
    models = list(models)
    if len(models) < 2:
        raise ValueError(f"align_many needs at least two models, got {len(models)}")
    iters, select_batches = positive_int(iters, "iters"), positive_int(select_batches, "select_batches")
    concentration = real(concentration, "concentration", low=0.0, open_low=True)
    tol, lr_perm = real(tol, "tol", low=0.0), real(lr_perm, "lr_perm", low=0.0, open_low=True)
    for model in models[1:]:
        spec = check_pair(models[0], model)
    check_symmetries(spec, symmetries)
    if method == "learned":
        data = _check_first_batch(models[0], data)
    start = time.perf_counter()
    canon = [canonicalize(m) for m in models]
    transforms, aligned, history = _universe(canon, symmetries, seed, iters, tol, progress)
    losses = []
    if method == "learned":
        transforms, losses = _learned_many(canon, transforms, data, 200 if steps is None else steps,
                                           1e-2 if lr is None else lr, lr_perm, seed,
                                           concentration, select_batches, progress)
        aligned = [apply_transforms(C, T) for C, T in zip(canon, transforms)]
    reference = interpolate_many(aligned, [1.0 / len(aligned)] * len(aligned))
    return ManyResult(aligned, transforms, reference, method, symmetries, time.perf_counter() - start,
                      history, losses)
