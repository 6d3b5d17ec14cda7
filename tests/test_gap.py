"""compare_solutions: identical solutions give zeros; a planted rotation gives its eigen-angles;
permutations count changed units; invertible maps their relative distance."""
import math

import pytest
import torch

from glmc_mini.gap import compare_solutions, eigen_angles
from glmc_mini.symmetries import Invertible, Orthogonal, Permutation, ones_complement


def rotation_fixing_ones(d, angles):
    """R = Q blockdiag(rot(theta_1), rot(theta_2), ..., I) Q^T + u u^T on 1-perp (Q a basis of it)."""
    B = torch.eye(d - 1, dtype=torch.float64)
    for i, t in enumerate(angles):
        c, s = math.cos(t), math.sin(t)
        B[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    Q = ones_complement(d)
    return Q @ B @ Q.T + torch.full((d, d), 1.0 / d, dtype=torch.float64)


def solution(seed=0, d=8):
    g = torch.Generator().manual_seed(seed)
    return {"residual": Orthogonal.random(d, generator=g), "ffn.0": Permutation.random(6, generator=g),
            "heads.0": Permutation.random(2, generator=g), "qk.0": Invertible.random(2, 4, generator=g)}


def test_identical_solutions_give_zeros():
    sol = solution()
    gap = compare_solutions(sol, sol)
    assert gap["ffn.0"]["changed"] == 0 and gap["heads.0"]["changed"] == 0
    assert gap["residual"]["max_angle"] < 1e-5 and gap["residual"]["fro"] == 0
    assert gap["qk.0"]["rel"] == 0


def test_planted_rotation_gives_its_angles():
    d, angles = 8, (0.1, 0.3, 0.7)
    Oa = solution()["residual"]
    Ob = Orthogonal((rotation_fixing_ones(d, angles) @ Oa.O.double()).float())
    gap = compare_solutions({"residual": Oa}, {"residual": Ob})["residual"]
    expected = torch.tensor(sorted([0.0] * (d - 2 * len(angles)) + [a for a in angles for _ in (0, 1)]))
    assert torch.allclose(gap["angles"].float(), expected, atol=1e-4)
    assert gap["max_angle"] == pytest.approx(0.7, abs=1e-4)
    assert gap["mean_angle"] == pytest.approx(2 * sum(angles) / d, abs=1e-4)
    assert gap["fro"] == pytest.approx(math.sqrt(sum(4 * (1 - math.cos(a)) for a in angles)), abs=1e-4)


def test_permutations_invertible_and_missing_spaces():
    a = {"ffn.0": Permutation(torch.tensor([0, 1, 2, 3])), "qk.0": Invertible(torch.eye(2).repeat(3, 1, 1))}
    b = {"ffn.0": Permutation(torch.tensor([1, 0, 2, 3])), "qk.0": Invertible(2 * torch.eye(2).repeat(3, 1, 1))}
    gap = compare_solutions(a, b)
    assert gap["ffn.0"]["changed"] == 0.5 and gap["qk.0"]["rel"] == pytest.approx(1.0)
    only = compare_solutions({}, {"ffn.0": Permutation(torch.tensor([1, 0, 2, 3]))})  # missing = identity
    assert only["ffn.0"]["changed"] == 0.5


def test_eigen_angles_of_a_plane_rotation():
    c, s = math.cos(0.4), math.sin(0.4)
    assert torch.allclose(eigen_angles(torch.tensor([[c, -s], [s, c]])), torch.tensor([0.4, 0.4], dtype=torch.float64))
