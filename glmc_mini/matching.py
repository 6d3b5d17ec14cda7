"""Weight matching and activation matching: coordinate descent over the spaces of a model.

Weight matching (data-free) maximises sum_p <W_p^A, T(W^B)_p> one space at a time, the others
held fixed, in random order, until a sweep no longer reduces ||A - T(B)||^2 (Git Re-Basin's loop,
generalised from permutations to four classes):

- FFN / hidden units and the residual stream as permutations: with C = sum_p A_p B_p^T over the
  space's axes (B with every other space's transform applied), maximise <P, C> by linear
  assignment (``scipy.optimize.linear_sum_assignment``);
- the residual stream as an orthogonal map: the same C, maximise <O, C> over O fixing the
  all-ones direction: O = Q polar(Q^T C Q) Q^T + u u^T (orthogonal Procrustes on the centred
  subspace; Q an orthonormal basis of 1-perp, u = 1/sqrt(d));
- heads: linear assignment on similarities of their QK and OV circuits, <QK_h^A, QK_k^B> +
  <OV_h^A, OV_k^B>, which no per-head invertible map can change;
- per-head invertible maps: with the head's query/key (or value/projection) factors as columns,
  X (d+1 x hd) and Y, G brings (X_B G, Y_B G^-T) close to (X_A, Y_A): both heads are balanced
  (equal Gram matrices of the two factors, unique up to an orthogonal map), and the balanced
  factors are matched by Procrustes (:func:`match_factors`).

Activation matching runs the same solvers on activation statistics of a batch (see
:func:`activation_matching`). Introduced in chapter 1 (permutations), extended in chapters 2-4.
"""
import random

import torch
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from .spaces import build_spec
from .symmetries import (Invertible, Orthogonal, Permutation, SemiPermutation, identity_transforms,
                         ones_complement, transform_state)


# --------------------------------------------------------------------------- solvers

def assignment(C):
    """The permutation maximising <P, C>: P[i, perm[i]] = 1. Inputs: C [n, n]."""
    _, cols = linear_sum_assignment(C.detach().double().cpu().numpy(), maximize=True)
    return Permutation(torch.as_tensor(cols))


def polar(C):
    """The orthogonal factor U V^T of C = U S V^T: argmax over orthogonal O of <O, C>."""
    U, _, Vh = torch.linalg.svd(C.double())
    return U @ Vh


def procrustes_fixing_ones(C):
    """argmax <O, C> over orthogonal O with O 1 = 1. Inputs: C [d, d] (float64 inside)."""
    d = C.shape[0]
    Q = ones_complement(d).to(C.device)
    R = polar(Q.T @ C.double() @ Q)
    O = Q @ R @ Q.T + torch.full((d, d), 1.0 / d, dtype=torch.float64, device=C.device)
    return Orthogonal(O.float())


def balancing(X, Y, eps=1e-9):
    """G [H, hd, hd] with (X G)^T (X G) = (Y G^-T)^T (Y G^-T): the balanced factors of X Y^T.

    With X = Ux Sx Vx^T, Y = Uy Sy Vy^T and Sx Vx^T Vy Sy = W S Z^T, G = Vx Sx^-1 W S^1/2, so
    X G = Ux W S^1/2 and Y G^-T = Uy Z S^1/2. Inputs: X, Y [H, rows, hd] (float64)."""
    _, Sx, Vxh = torch.linalg.svd(X, full_matrices=False)
    _, Sy, Vyh = torch.linalg.svd(Y, full_matrices=False)
    Sx, Sy = Sx.clamp_min(eps * Sx.amax(-1, keepdim=True)), Sy.clamp_min(eps * Sy.amax(-1, keepdim=True))
    M = Sx[..., :, None] * (Vxh @ Vyh.transpose(-1, -2)) * Sy[..., None, :]
    W, S, _ = torch.linalg.svd(M)
    return Vxh.transpose(-1, -2) @ (W / Sx[..., :, None]) * S.sqrt()[..., None, :]


def match_factors(XA, YA, XB, YB):
    """Per-head invertible G with X_B G ≈ X_A and Y_B G^-T ≈ Y_A (closed form).

    Balance both heads (:func:`balancing`), then the balanced factors differ by an orthogonal R,
    found by Procrustes: R = polar(Xb_B^T Xb_A + Yb_B^T Yb_A); G = G_B R G_A^-1. Exact when B's
    head is A's head under an invertible map. Inputs: [H, rows, hd] factors (float64)."""
    GA, GB = balancing(XA, YA), balancing(XB, YB)
    R = polar((XB @ GB).transpose(-1, -2) @ (XA @ GA) +
              (YB @ torch.linalg.inv(GB).transpose(-1, -2)).transpose(-1, -2) @
              (YA @ torch.linalg.inv(GA).transpose(-1, -2)))
    return GB @ R @ torch.linalg.inv(GA)


# --------------------------------------------------------------------------- cross-products

def _axis_view(x, dim, seg, unit):
    """The segment of axis ``dim`` as rows: [units, unit * rest]."""
    y = x.narrow(dim, seg.start, seg.stop - seg.start).movedim(dim, 0)
    return y.reshape(y.shape[0] // unit, -1)


def cross(spec, space, A, B):
    """C = sum over axes of ``space`` of A_axis B_axis^T ([n, n], float32 on A's device)."""
    s = spec.spaces[space]
    C = None
    for p in spec.params_of(space):
        for dim, segments in enumerate(spec.axes[p]):
            for seg in segments or ():
                if any(name == space for name, _ in seg.chain):
                    a = _axis_view(A[p].float(), dim, seg, s.unit)
                    b = _axis_view(B[p].float(), dim, seg, s.unit)
                    C = a @ b.T if C is None else C + a @ b.T
    return C


def head_factors(spec, state, layer):
    """Per-head factors as columns: q, k, v [H, d+1, hd] (bias as the last row) and o [H, d, hd]."""
    found = {}
    roles = {(f"qk.{layer}", "out"): "q", (f"qk.{layer}", "in"): "k",
             (f"ov.{layer}", "out"): "v", (f"ov.{layer}", "in"): "o"}
    H = spec.spaces[f"heads.{layer}"].size
    for p in spec.params_of(f"heads.{layer}"):
        for dim, segments in enumerate(spec.axes[p]):
            for seg in segments or ():
                key = roles.get(seg.chain[0])
                if key:
                    y = state[p].narrow(dim, seg.start, seg.stop - seg.start).movedim(dim, -1)  # (..., H*hd)
                    y = y.reshape(*y.shape[:-1], H, -1).movedim(-2, 0)  # (H, [d,] hd)
                    found.setdefault(key, {})["bias" if y.dim() == 2 else "weight"] = y
    out = {}
    for key, parts in found.items():
        W = parts["weight"]  # (H, d, hd)
        out[key] = torch.cat([W, parts["bias"][:, None, :]], 1) if "bias" in parts else \
            (torch.cat([W, torch.zeros_like(W[:, :1])], 1) if key != "o" else W)
    return out


def circuits(f):
    """QK [H, d+1, d+1] = Q K^T and OV [H, d+1, d] = V O^T from :func:`head_factors`."""
    return f["q"] @ f["k"].transpose(1, 2), f["v"] @ f["o"].transpose(1, 2)


# --------------------------------------------------------------------------- weight matching

def _state(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def _updatable(spec, symmetries):
    """Spaces the solver updates, with the class it uses on each."""
    out = {}
    for name, s in spec.spaces.items():
        allowed = [c for c in s.classes if c in symmetries]
        if s.kind in ("qk", "ov"):
            if "inv" in allowed:
                out[name] = "inv"
        elif s.kind == "residual" and "orth" in allowed:
            out[name] = "orth"
        elif "perm" in symmetries or "semi" in symmetries:
            out[name] = "semi" if ("semi" in allowed and s.kind in ("ffn", "hidden")) else "perm"
    return out


def distance(A, B):
    """sum_p ||A_p - B_p||^2 over the float parameters both hold."""
    return sum(float((A[k] - B[k].to(A[k].dtype)).float().pow(2).sum()) for k in A
               if A[k].is_floating_point() and k in B)


def _others(transforms, space):
    return {k: v for k, v in transforms.items() if k != space}


def _subset(state, spec, space):
    return {p: state[p] for p in spec.params_of(space)}


def _update_units(spec, space, cls, A, B, transforms):
    Bp = transform_state(_subset(B, spec, space), spec, _others(transforms, space), check=False)
    C = cross(spec, space, A, Bp)
    if cls == "orth":
        return procrustes_fixing_ones(C)
    P = assignment(C)
    if cls == "semi":  # ReLU: rescale each matched unit to its partner's incoming norm
        return _rescaled(spec, space, A, Bp, P)
    return P


def _rescaled(spec, space, A, Bp, P):
    """Scaled permutation: s_i = ||a_i|| / ||b_perm[i]|| on the incoming ("out") axes."""
    na = torch.zeros(spec.spaces[space].size, dtype=torch.float64)
    nb = torch.zeros_like(na)
    for p in spec.params_of(space):
        for dim, segments in enumerate(spec.axes[p]):
            for seg in segments or ():
                if seg.chain[0] == (space, "out"):
                    na += _axis_view(A[p], dim, seg, 1).double().pow(2).sum(1).cpu()
                    nb += _axis_view(Bp[p], dim, seg, 1).double().pow(2).sum(1).cpu()
    scale = (na.sqrt() / nb[P.perm].sqrt().clamp_min(1e-12)).clamp(1e-3, 1e3)
    return SemiPermutation(P.perm, scale.float(), n=len(P.perm))


def _update_heads(spec, space, A, B, transforms):
    """Heads by assignment on QK and OV circuit similarities (invariant to per-head maps)."""
    l = spec.spaces[space].layer
    keep = {k: v for k, v in transforms.items() if k in ("residual",)}
    Bp = transform_state(_subset(B, spec, space), spec, keep, check=False)
    qk_a, ov_a = circuits(head_factors(spec, A, l))
    qk_b, ov_b = circuits(head_factors(spec, Bp, l))
    C = qk_a.flatten(1) @ qk_b.flatten(1).T + ov_a.flatten(1) @ ov_b.flatten(1).T
    return assignment(C)


def _update_invertible(spec, space, A, B, transforms):
    """Per-head G from :func:`match_factors`, stored by source head (the map acts before heads)."""
    l = spec.spaces[space].layer
    heads = f"heads.{l}"
    keep = {k: v for k, v in transforms.items() if k in ("residual", heads)}
    Bp = transform_state(_subset(B, spec, heads), spec, keep, check=False)
    fa, fb = head_factors(spec, A, l), head_factors(spec, Bp, l)
    x, y = ("q", "k") if spec.spaces[space].kind == "qk" else ("v", "o")
    G = match_factors(*(t.double() for t in (fa[x], fa[y], fb[x], fb[y])))
    blocks = torch.empty_like(G)
    perm = transforms[heads].perm if heads in transforms else torch.arange(len(G))
    blocks[perm.to(G.device)] = G.transpose(1, 2)
    return Invertible(blocks.to(A[spec.params_of(space)[0]].dtype))


def weight_matching(model_a, model_b, symmetries=("perm", "orth", "inv"), seed=0, max_iter=50,
                    tol=1e-4, patience=2, restarts=3, progress=False, init=None, fixed=()):
    """Data-free alignment of B onto A: transforms {space: Transform} with T(B) close to A.

    Coordinate descent (module docstring) in a random order per sweep. The head and per-head
    updates are not exact minimisers of ||A - T(B)||^2, so a sweep can raise it: the loop stops
    once the best distance has not improved by ``tol`` (relative) for ``patience`` sweeps, or
    after ``max_iter``. Different orders reach different fixed points, so it runs ``restarts``
    seeded orders and keeps the lowest distance (still data-free). ``init`` starts from given
    transforms; spaces in ``fixed`` keep theirs.
    Returns (transforms, history of distances of the kept run).
    """
    spec = build_spec(model_a)
    A, B = _state(model_a), _state(model_b)
    classes = _updatable(spec, symmetries)
    start = {k: v for k, v in {**identity_transforms(spec), **(init or {})}.items() if k in classes}
    runs = [_descend(spec, A, B, classes, dict(start), random.Random(seed + 1000 * r), max_iter, tol, patience,
                     fixed, progress) for r in range(max(1, restarts))]
    best = min(runs, key=lambda run: min(run[1]))
    return best


def _descend(spec, A, B, classes, T, rng, max_iter, tol, patience, fixed, progress):
    """One coordinate-descent run; returns (best transforms, distances per sweep)."""
    history = [distance(A, transform_state(B, spec, T, check=False))]
    best, stale = (history[0], dict(T)), 0
    bar = tqdm(range(max_iter), desc="weight matching", disable=not progress, leave=False)
    for _ in bar:
        order = [s for s in classes if s not in fixed]
        rng.shuffle(order)
        for space in order:
            T[space] = _update(spec, space, classes[space], A, B, T)
        history.append(distance(A, transform_state(B, spec, T, check=False)))
        bar.set_postfix(dist=f"{history[-1]:.4g}")
        improved = history[-1] < best[0] * (1 - tol)
        if history[-1] < best[0]:
            best = (history[-1], dict(T))
        stale = 0 if improved else stale + 1
        if stale >= patience:
            break
    return best[1], history


def _update(spec, space, cls, A, B, T):
    kind = spec.spaces[space].kind
    if kind == "heads" and spec.family != "circuit":
        return _update_heads(spec, space, A, B, T)
    if cls == "inv":
        return _update_invertible(spec, space, A, B, T)
    return _update_units(spec, space, cls, A, B, T)


# --------------------------------------------------------------------------- activation matching

def _unit_modules(model, spec):
    """{space: module whose output holds the space's activations} for FFN / hidden units, and
    {"residual": [LayerNorms]} whose inputs are the residual stream."""
    import torch.nn as nn
    if spec.family == "mlp":
        acts = [m for m in model.children() if not isinstance(m, (nn.Linear, nn.Flatten, nn.Dropout, nn.Identity))]
        return {f"hidden.{i}": m for i, m in enumerate(acts[:len(spec.of_kind("hidden"))])}, []
    blocks = model.blocks if spec.family == "vit" else model.transformer.h
    units = {f"ffn.{l}": blk.mlp.act for l, blk in enumerate(blocks)}
    d = spec.spaces["residual"].size
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm) and m.normalized_shape == (d,)]
    return units, norms


class _Stats:
    """Streaming cross-correlation of two activation matrices X_A, X_B [N, n]."""

    def __init__(self):
        self.sa = self.sb = self.saa = self.sbb = self.sab = None
        self.count = 0

    def add(self, a, b):
        a, b = a.double(), b.double()
        parts = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b)
        if self.sab is None:
            self.sa, self.sb, self.saa, self.sbb, self.sab = parts
        else:
            for name, p in zip(("sa", "sb", "saa", "sbb", "sab"), parts):
                setattr(self, name, getattr(self, name) + p)
        self.count += a.shape[0]

    def correlation(self):
        n = self.count
        ma, mb = self.sa / n, self.sb / n
        cov = self.sab / n - ma[:, None] * mb[None, :]
        sa = (self.saa / n - ma ** 2).clamp_min(1e-12).sqrt()
        sb = (self.sbb / n - mb ** 2).clamp_min(1e-12).sqrt()
        return cov / (sa[:, None] * sb[None, :])

    def cross(self):
        return self.sab


def _record(model, units, norms, batch):
    """Run ``model`` on ``batch`` and return {space: activations [N, n]} ("residual" stacks every norm input)."""
    from .models import batch_loss, model_kind
    got, hooks = {}, []
    for space, module in units.items():
        hooks.append(module.register_forward_hook(
            lambda m, i, o, s=space: got.__setitem__(s, o.detach().reshape(-1, o.shape[-1]))))
    for module in norms:
        hooks.append(module.register_forward_hook(
            lambda m, i, o: got.setdefault("residual", []).append(i[0].detach().reshape(-1, i[0].shape[-1]))))
    try:
        with torch.no_grad():
            batch_loss(model, batch, model_kind(model))
    finally:
        for h in hooks:
            h.remove()
    if "residual" in got:
        got["residual"] = torch.cat(got["residual"])
    return got


def activation_matching(model_a, model_b, data, symmetries=("perm", "orth", "inv"), seed=0, max_batches=8,
                        progress=False):
    """Align B onto A from activation statistics of a shared batch stream.

    FFN / hidden units: linear assignment on the correlation of their activations over the data;
    the residual stream: Procrustes (fixing ones) or assignment on the cross-covariance of the
    stream entering every LayerNorm. Heads and per-head maps have no activations of their own that
    are free of the other choices, so with the units and the stream fixed they are solved as in
    weight matching (circuit similarity, balanced factor matching).
    Returns {space: Transform}.
    """
    spec = build_spec(model_a)
    classes = _updatable(spec, symmetries)
    units_a, norms_a = _unit_modules(model_a, spec)
    units_b, norms_b = _unit_modules(model_b, spec)
    stats = {}
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        fa, fb = _record(model_a, units_a, norms_a, batch), _record(model_b, units_b, norms_b, batch)
        for space in fa:
            if space in classes:
                stats.setdefault(space, _Stats()).add(fa[space], fb[space])
    if not stats:
        raise ValueError("activation matching got no batches")
    T = {}
    for space, st in stats.items():
        if classes[space] == "orth":
            T[space] = procrustes_fixing_ones(st.cross().float())
        else:
            T[space] = assignment(st.correlation())
    rest, _ = weight_matching(model_a, model_b, symmetries, seed=seed, init=T, fixed=tuple(T), progress=progress)
    return rest
