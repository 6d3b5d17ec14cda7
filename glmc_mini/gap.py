"""Comparing two alignment solutions space by space (e.g. weight matching against learned matching).

The paper finds that the gap between weight and learned matching sits almost entirely in the
residual orthogonal map, as a small correction whose eigen-angles cluster near 0, while the
permutations barely change (Theus et al. 2025). :func:`compare_solutions` measures exactly that:

- permutations (and semi-permutations): the fraction of units sent elsewhere, ``changed``;
- orthogonal maps: the eigen-angles of the correction ``O_b O_a^T`` (its eigenvalues are
  e^{±i theta}), their max and mean, and ``||O_b - O_a||_F``;
- invertible per-head maps: the relative distance ``||A_b - A_a||_F / ||A_a||_F``.

Introduced in chapter 5.
"""
import torch

from .symmetries import Invertible, Orthogonal, Permutation, eigen_angles  # noqa: F401 (eigen_angles: gm.eigen_angles)


def _identity_like(T):
    if isinstance(T, Invertible):
        return Invertible(torch.eye(T.A.shape[-1], dtype=T.A.dtype, device=T.A.device).repeat(T.A.shape[0], 1, 1))
    if isinstance(T, Orthogonal):
        return Orthogonal(torch.eye(T.O.shape[0], dtype=T.O.dtype, device=T.O.device))
    return Permutation.identity(T.n)


def compare_space(Ta, Tb):
    """The comparison of two transforms of one space: the class's own ``compare`` (symmetries); a
    permutation against an orthogonal map is compared as an orthogonal map (it is one)."""
    if isinstance(Ta, Invertible) != isinstance(Tb, Invertible):
        raise TypeError(f"cannot compare {type(Ta).__name__} with {type(Tb).__name__}")
    if isinstance(Tb, Orthogonal) and not isinstance(Ta, Orthogonal):
        Ta = Orthogonal(Ta.out_matrix())
    return Ta.compare(Tb)


def compare_solutions(sol_a, sol_b):
    """Space-by-space difference of two alignment solutions of the same pair of models.

    Inputs: sol_a, sol_b {space name: Transform} (e.g. ``AlignResult.transforms`` of weight and of
    learned matching); a space solved in only one of them counts as the identity in the other.
    Returns {space: dict} with ``class`` and, per class: ``changed`` (fraction of units that
    differ; perm / semi), ``angles`` [n] (sorted |eigen-angles| of O_b O_a^T, radians),
    ``max_angle``, ``mean_angle``, ``fro`` = ||O_b - O_a||_F (orth), ``rel`` =
    ||A_b - A_a||_F / ||A_a||_F (inv). Introduced in chapter 5.
    """
    out = {}
    for name in list(sol_a) + [k for k in sol_b if k not in sol_a]:
        Ta = sol_a[name] if name in sol_a else _identity_like(sol_b[name])
        Tb = sol_b[name] if name in sol_b else _identity_like(sol_a[name])
        out[name] = compare_space(Ta, Tb)
    return out


def summarize(comparison):
    """One line per space: the headline number of :func:`compare_solutions`' entry."""
    lines = []
    for name, c in comparison.items():
        if c["class"] == "orth":
            lines.append(f"{name:>12}  orth  max angle {c['max_angle']:.4f} rad, mean {c['mean_angle']:.4f}, "
                         f"||dO||_F {c['fro']:.4f}")
        elif c["class"] == "inv":
            lines.append(f"{name:>12}  inv   relative change {c['rel']:.4f}")
        else:
            lines.append(f"{name:>12}  {c['class']:<5} units changed {c['changed']:.1%}")
    return "\n".join(lines)
