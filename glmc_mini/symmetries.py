"""The four symmetry classes as transformations of one space, and their action on a model.

Each transform maps a space of ``n`` units to ``m`` units (``m = n`` except for widening maps) and
exposes two matrices that act *along a parameter axis*:

    out_matrix  T      [m, n]   axes that carry a vector of the space:        v -> T v
    in_matrix   T^+^T  [m, n]   axes read against it, with in^T out = I_n:    W -> W T^+
                                (rectangular Orthogonal: sqrt(m/n) I_n, see 3.)

For a square invertible T, ``in = T^-T``; for a permutation or orthogonal map, ``in = out``.
The classes are nested, S1 ⊂ S2 ⊂ S3 ⊂ S4:

1. :class:`Permutation`: ``(P v)_i = v_perm[i]``. Exact wherever a nonlinearity acts element-wise.
2. :class:`SemiPermutation`: target unit k copies source ``src[k]`` scaled by ``scale[k] > 0`` and
   passes on a ``share[k]`` of it (shares of one source sum to 1). Exact for ReLU, since
   ReLU(s z) = s ReLU(z) for s > 0 and sum_k share_k ReLU(z) = ReLU(z); and for attention heads
   (copies share the QK circuit and divide the OV circuit, scale 1).
3. :class:`Orthogonal`: ``O`` with orthonormal columns. On the residual stream it must fix the
   all-ones direction, so that it commutes with LayerNorm's centring: LayerNorm(O x) = O LayerNorm(x)
   once the norm's gain is 1 (see ``canonical``). A rectangular O (m > n) embeds a narrower
   stream; writers then carry ``sqrt(m/n) O`` so that the per-coordinate RMS is unchanged, and
   readers O, so for this class alone in^T out = sqrt(m/n) I_n: the reader sees the stream scaled
   by sqrt(m/n), which the LayerNorm in front of every reader removes.
4. :class:`Invertible`: one invertible map per head (block-diagonal): the query gets A and the key
   A^-T (so q^T k is unchanged), the value gets B and the output projection B^-1.

Introduced in chapter 1 (permutations), extended in chapters 2-4.
"""
import concurrent.futures
import copy
import math

import torch

from .spaces import build_spec, UnsupportedModelError


def _move(x, dim):
    return x.movedim(dim, 0)


_SMALL_LINALG = None   # the worker thread of ``small_linalg``, started on first use


def _one_torch_thread():
    # Under OpenMP (every official x86 build) the intra-op thread count is per calling thread, so
    # this worker's count does not touch the caller's; elsewhere it is process-wide: leave it.
    if "OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(1)


def small_linalg(fn, *args):
    """``fn(*args)`` for a small factorization (per-head inverses, SVDs) of CPU tensors, run on a
    worker thread that uses one torch thread. They gain nothing from intra-op threads and on a busy
    machine lose 10-100x to them (the threads wait on each other at every LAPACK step: an SVD of
    767 x 767 took 7.9 s on two threads, 0.17 s on one, on a loaded 2-core machine). The caller's
    thread count is never changed; grad mode is the caller's. GPU tensors run in place."""
    if any(torch.is_tensor(a) and a.device.type != "cpu" for a in args):
        return fn(*args)
    global _SMALL_LINALG
    if _SMALL_LINALG is None:
        _SMALL_LINALG = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="glmc-small-linalg", initializer=_one_torch_thread)
    grad = torch.is_grad_enabled()

    def run():
        with torch.set_grad_enabled(grad):
            return fn(*args)
    return _SMALL_LINALG.submit(run).result()


class Transform:
    """Base class: one element of a symmetry class acting on one space.

    Each class keeps its rules here, in one place (the solvers of ``matching`` aside, which work on
    the space's kind): ``draw`` (a random element for a space), ``neutral`` (the identity),
    ``validate`` (what an element must satisfy on a space beyond its size), ``compare`` (the
    difference of two solutions, ``gap``), ``to_parameter`` / ``from_parameter`` (the free
    parameters of learned matching and their projection onto the class)."""
    cls = None  # "perm" | "semi" | "orth" | "inv"
    why = ""  # where the class acts exactly (for refusals)

    @classmethod
    def draw(cls, space, generator=None):
        """A random element acting on ``space``."""
        raise NotImplementedError

    @classmethod
    def neutral(cls, space):
        """The identity of ``space`` in this class."""
        raise NotImplementedError

    def validate(self, space, state, spec):
        """UnsupportedModelError if this element cannot act on ``space`` of the model with ``state``."""

    def compare(self, other):
        """{"class": ..., headline numbers}: how ``other`` differs from this solution (``gap``)."""
        raise NotImplementedError

    @classmethod
    def to_parameter(cls, T, space):
        """{name suffix: tensor}: the free parameters of learned matching starting at ``T`` ("" is
        trained; other entries are constant buffers)."""
        raise NotImplementedError

    @classmethod
    def from_parameter(cls, tensors, space, hard=False):
        """The element given by :meth:`to_parameter`'s tensors: differentiable, or ``hard`` (detached)."""
        raise NotImplementedError

    @property
    def n(self):
        return self.out_matrix().shape[1]

    @property
    def m(self):
        return self.out_matrix().shape[0]

    def matrix(self, role):
        """The along-axis matrix for ``role`` ("out", "copy", "in", "norm" or "gain")."""
        if role in ("out", "copy"):
            return self.out_matrix()
        if role == "in":
            return self.in_matrix()
        return self.norm_matrix()

    def norm_matrix(self):
        raise UnsupportedModelError(f"a {type(self).__name__} does not commute with LayerNorm; "
                                    "only permutations and orthogonal maps act on the residual stream")

    def apply(self, x, dim, role, unit=1, blocks=1, repeat=1):
        """Act on axis ``dim`` of ``x`` (length n * unit) with the matrix of ``role``: kron(R, I_unit)."""
        R = self.matrix(role).to(device=x.device, dtype=x.dtype)
        y = _move(x, dim)
        rest = y.shape[1:]
        y = y.reshape(R.shape[1], unit, -1)
        y = torch.einsum("mn,nur->mur", R, y)
        return y.reshape(R.shape[0] * unit, *rest).movedim(0, dim)

    def is_permutation(self):
        return False

    def __repr__(self):
        return f"{type(self).__name__}({self.n} -> {self.m})"


class Permutation(Transform):
    """``(P v)_i = v[perm[i]]``: unit i of the new order is unit ``perm[i]`` of the old.

    Inputs: perm LongTensor [n]. ``matrix`` optionally overrides the dense form (a straight-through
    estimate in learned matching); then ``perm`` is its hard forward value."""
    cls = "perm"

    def __init__(self, perm, matrix=None):
        self.perm = torch.as_tensor(perm, dtype=torch.long)
        self._matrix = matrix

    def out_matrix(self):
        if self._matrix is not None:
            return self._matrix
        n = len(self.perm)
        P = torch.zeros(n, n, device=self.perm.device)
        P[torch.arange(n, device=self.perm.device), self.perm] = 1.0
        return P

    in_matrix = norm_matrix = out_matrix

    @property
    def n(self):
        return len(self.perm)

    m = n

    def apply(self, x, dim, role, unit=1, blocks=1, repeat=1):
        if self._matrix is not None:
            return super().apply(x, dim, role, unit)
        idx = (self.perm.to(x.device)[:, None] * unit + torch.arange(unit, device=x.device)).reshape(-1)
        return x.index_select(dim, idx)

    def is_permutation(self):
        return True

    def inverse(self):
        return Permutation(torch.argsort(self.perm))

    def compose(self, first):
        """self ∘ first (first applied first)."""
        if isinstance(first, Permutation):
            return Permutation(first.perm[self.perm])
        if isinstance(first, SemiPermutation):  # S1 ⊂ S2: the result is a semi-permutation
            return SemiPermutation(self.perm, n=self.n).compose(first)
        if isinstance(first, Orthogonal):  # S1 ⊂ S3
            return Orthogonal(self.out_matrix().to(first.O) @ first.O)
        return _dense_compose(self, first)

    @staticmethod
    def identity(n):
        return Permutation(torch.arange(n))

    @staticmethod
    def random(n, generator=None):
        return Permutation(torch.randperm(n, generator=generator))

    why = "permutations act wherever units meet an element-wise map"

    @classmethod
    def draw(cls, space, generator=None):
        if space.blocks > 1:  # each unit stays in its block (query heads in their key-value group)
            size = space.size // space.blocks
            return Permutation(torch.cat([b * size + torch.randperm(size, generator=generator)
                                          for b in range(space.blocks)]))
        return Permutation.random(space.size, generator)

    @classmethod
    def neutral(cls, space):
        return Permutation.identity(space.size)

    def compare(self, other):
        return _compare_units(self, other)

    @classmethod
    def to_parameter(cls, T, space):
        """Scores S [n, n], one-hot at T's assignment (a semi-permutation's sources)."""
        P = T.out_matrix() if isinstance(T, Permutation) else Permutation(T.src).out_matrix()
        return {"": P.float().clone()}

    @classmethod
    def from_parameter(cls, tensors, space, hard=False):
        """hungarian(S) (within the blocks of a block-structured space), straight-through:
        the forward pass uses the hard permutation, the gradient flows to S."""
        from .matching import assignment
        S = tensors[""]
        outside = 0.0
        if space.blocks > 1:
            b = torch.arange(S.shape[0], device=S.device) // (S.shape[0] // space.blocks)
            outside = torch.where(b[:, None] == b[None, :], 0.0, -1e9).to(S.dtype)
        P = assignment(S + outside)
        return P if hard else Permutation(P.perm, P.out_matrix().to(S) + S - S.detach())


class SemiPermutation(Transform):
    """Sparse non-negative splitting map from n to m >= n units.

    out[k, src[k]] = scale[k] (incoming weights copied and rescaled);
    in[k, src[k]] = share[k] / scale[k] (outgoing weights divided among the copies).
    Inputs: src LongTensor [m] covering every source unit, scale [m] > 0, share [m] >= 0 with
    sum over copies of one source = 1."""
    cls = "semi"

    def __init__(self, src, scale=None, share=None, n=None):
        self.src = torch.as_tensor(src, dtype=torch.long)
        m = len(self.src)
        self._n = int(n if n is not None else self.src.max() + 1)
        self.scale = torch.ones(m, device=self.src.device) if scale is None else \
            torch.as_tensor(scale, dtype=torch.float32)
        self.share = self._even_shares() if share is None else torch.as_tensor(share, dtype=torch.float32)
        self._check()

    def _even_shares(self):
        counts = torch.bincount(self.src, minlength=self._n).float()
        return 1.0 / counts[self.src]

    def _check(self):
        counts = torch.bincount(self.src, minlength=self._n)
        if (counts == 0).any():
            raise ValueError(f"semi-permutation drops source units {torch.nonzero(counts == 0).flatten().tolist()}")
        if (self.scale <= 0).any() or (self.share < 0).any():
            raise ValueError("semi-permutation needs scale > 0 and share >= 0")
        sums = torch.zeros(self._n, dtype=self.share.dtype, device=self.share.device).index_add_(
            0, self.src.to(self.share.device), self.share)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-5):
            raise ValueError(f"semi-permutation shares of a source must sum to 1 (worst {sums.sub(1).abs().max():.2e})")

    @property
    def n(self):
        return self._n

    @property
    def m(self):
        return len(self.src)

    def _sparse(self, values):
        M = torch.zeros(self.m, self.n, dtype=values.dtype, device=values.device)
        M[torch.arange(self.m, device=values.device), self.src.to(values.device)] = values
        return M

    def out_matrix(self):
        return self._sparse(self.scale)

    def in_matrix(self):
        return self._sparse(self.share / self.scale)

    def apply(self, x, dim, role, unit=1, blocks=1, repeat=1):
        idx = (self.src.to(x.device)[:, None] * unit + torch.arange(unit, device=x.device)).reshape(-1)
        if role in ("norm", "gain"):
            return self.norm_matrix()  # raises: only permutations and orthogonal maps act there
        if role == "copy":  # copied, never rescaled (a SwiGLU gate row)
            return x.index_select(dim, idx)
        w = self.scale if role == "out" else self.share / self.scale
        w = w.to(x.device, x.dtype).repeat_interleave(unit)
        y = _move(x.index_select(dim, idx), dim)
        return (y * w.view(-1, *([1] * (y.dim() - 1)))).movedim(0, dim)

    def is_permutation(self):
        return self.m == self.n and bool((self.scale == 1).all()) and len(set(self.src.tolist())) == self.n

    def inverse(self):
        if self.m != self.n:
            raise ValueError("only a square semi-permutation (a scaled permutation) has an inverse in the class")
        inv = torch.argsort(self.src)
        return SemiPermutation(inv, scale=1.0 / self.scale[inv], n=self.n)

    def compose(self, first):
        """self ∘ first: units of self's source space are first's targets."""
        if isinstance(first, (SemiPermutation, Permutation)):
            f = first if isinstance(first, SemiPermutation) else SemiPermutation(first.perm, n=first.n)
            return SemiPermutation(f.src[self.src], self.scale * f.scale[self.src],
                                   self.share * f.share[self.src], n=f.n)
        return _dense_compose(self, first)

    @staticmethod
    def identity(n):
        return SemiPermutation(torch.arange(n), n=n)

    why = "semi-permutations are exact only for ReLU units, SwiGLU units (their up factor) and attention heads"

    @classmethod
    def draw(cls, space, generator=None):
        return SemiPermutation.random(space.size, generator=generator)

    @classmethod
    def neutral(cls, space):
        return SemiPermutation.identity(space.size)

    def validate(self, space, state, spec):
        if space.kind == "heads" and bool((self.scale != 1).any()):
            raise UnsupportedModelError("attention heads admit splitting but not rescaling (scale must be 1)")

    def compare(self, other):
        return _compare_units(self, other)

    to_parameter = Permutation.to_parameter  # learned matching searches its permutation part
    from_parameter = Permutation.from_parameter

    @staticmethod
    def random(n, m=None, generator=None, max_scale=2.0):
        """A random element: a permutation, positive scales in [1/max_scale, max_scale], and
        (m > n) m - n extra copies of random sources with random shares."""
        m = n if m is None else m
        src = torch.cat([torch.arange(n), torch.randint(n, (m - n,), generator=generator)])
        src = src[torch.randperm(m, generator=generator)]
        log_s = (torch.rand(m, generator=generator) * 2 - 1) * math.log(max_scale)
        raw = torch.rand(m, generator=generator) + 0.1
        share = raw / torch.zeros(n).index_add_(0, src, raw)[src]
        return SemiPermutation(src, log_s.exp(), share, n=n)


class Orthogonal(Transform):
    """``O`` [m, n] with orthonormal columns (m >= n). Writers carry ``sqrt(m/n) O`` (RMS kept),
    readers ``O``: in^T out = sqrt(m/n) I_n, undone by the LayerNorm in front of each reader."""
    cls = "orth"

    def __init__(self, O):
        self.O = O

    def out_matrix(self):
        m, n = self.O.shape
        return self.O if m == n else self.O * math.sqrt(m / n)

    def in_matrix(self):
        return self.O

    norm_matrix = in_matrix

    def fixes_ones(self, atol=1e-4):
        """Does O map the normalised all-ones vector of R^n to that of R^m?"""
        m, n = self.O.shape
        ones = torch.ones(n, dtype=self.O.dtype, device=self.O.device) / math.sqrt(n)
        return bool(torch.allclose(self.O @ ones, torch.full((m,), 1 / math.sqrt(m), dtype=self.O.dtype,
                                                           device=self.O.device), atol=atol))

    def inverse(self):
        if self.O.shape[0] != self.O.shape[1]:
            raise ValueError("a rectangular orthogonal embedding has no inverse in the class")
        return Orthogonal(self.O.T)

    def compose(self, first):
        if isinstance(first, Orthogonal):
            return Orthogonal(self.O @ first.O)
        if isinstance(first, Permutation):
            return Orthogonal(self.O @ first.out_matrix().to(self.O))
        return _dense_compose(self, first)

    @staticmethod
    def identity(n):
        return Orthogonal(torch.eye(n))

    why = "orthogonal maps act only on the residual stream"

    @classmethod
    def draw(cls, space, generator=None):
        return Orthogonal.random(space.size, generator=generator, fix_ones=space.fix_ones)

    @classmethod
    def neutral(cls, space):
        return Orthogonal.identity(space.size)

    def validate(self, space, state, spec):
        if space.kind == "residual":
            _check_residual(space, self, state, spec)

    def compare(self, other):
        return _compare_orthogonal(self.out_matrix(), other.out_matrix())

    @classmethod
    def to_parameter(cls, T, space):
        """Z = Q^T O Q on the subspace the map is free on (Q: a basis of 1-perp where O must fix the
        all-ones direction, else the identity)."""
        d = T.O.shape[0]
        Q = (ones_complement(d, torch.float32) if space.fix_ones else torch.eye(d)).to(T.O.device)
        return {"": Q.T @ T.O.float() @ Q, "_Q": Q}

    @classmethod
    def from_parameter(cls, tensors, space, hard=False):
        """O = Q polar(Z) Q^T (+ u u^T where O fixes the all-ones direction); polar by Newton-Schulz
        when differentiable (finite gradients where an SVD's would not be), by SVD when hard."""
        from .learned import newton_schulz_polar
        from .matching import polar
        Z, Q = tensors[""], tensors["_Q"]
        R = polar(Z.detach()).to(Z) if hard else newton_schulz_polar(Z)
        d = Q.shape[0]
        ones = 1.0 / d if Q.shape[1] < d else 0.0
        return Orthogonal(Q @ R @ Q.T + torch.full((d, d), ones, device=Z.device, dtype=Z.dtype))

    @staticmethod
    def retract(tensors):
        """Put Z back on the group after an optimiser step (keeps Newton-Schulz in its basin)."""
        from .matching import polar
        Z = tensors[""]
        with torch.no_grad():
            Z.copy_(polar(Z).to(Z))

    @staticmethod
    def random(n, m=None, generator=None, fix_ones=True):
        """Haar-random on the subspace orthogonal to the all-ones vector (``fix_ones``), plus
        ``u_m u_n^T`` with u the normalised all-ones vectors: O 1 ∝ 1 and O^T O = I."""
        m = n if m is None else m
        if not fix_ones:
            return Orthogonal(_haar(m, n, generator))
        Qn, Qm = ones_complement(n), ones_complement(m)
        R = _haar(m - 1, n - 1, generator).double()
        O = Qm @ R @ Qn.T + torch.ones(m, n, dtype=torch.float64) / math.sqrt(m * n)
        return Orthogonal(O.float())


def _haar(m, n, generator=None):
    G = torch.randn(m, n, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diagonal(R))).float()


def ones_complement(n, dtype=torch.float64):
    """An orthonormal basis [n, n-1] of the subspace orthogonal to the all-ones vector (Helmert)."""
    H = torch.zeros(n, n - 1, dtype=dtype)
    for k in range(1, n):
        H[:k, k - 1] = 1.0
        H[k, k - 1] = -k
        H[:, k - 1] /= math.sqrt(k * (k + 1))
    return H


class Invertible(Transform):
    """Block-diagonal invertible map, one [hd, hd] block per head. Inputs: A [H, hd, hd]."""
    cls = "inv"

    def __init__(self, A):
        self.A = A

    def out_matrix(self):
        return torch.block_diag(*self.A)

    def in_matrix(self):
        return torch.block_diag(*self.inv_t())

    def inv_t(self):
        """A^-T per block, computed in float64."""
        return small_linalg(torch.linalg.inv, self.A.double()).transpose(-1, -2).to(self.A.dtype)

    def apply(self, x, dim, role, unit=1, blocks=1, repeat=1):
        """Block h acts on entries h*hd:(h+1)*hd; with ``repeat`` r, on each of r consecutive copies
        of that span (one key-value head's map on each of its query heads)."""
        if role in ("norm", "gain"):
            return self.norm_matrix()
        B = self.A if role == "out" else self.inv_t()
        B = B.to(device=x.device, dtype=x.dtype)
        H, hd, _ = B.shape
        y = _move(x, dim)
        rest = y.shape[1:]
        y = torch.einsum("hij,hcjr->hcir", B, y.reshape(H, repeat, hd, -1))  # (H, r, hd, rest)
        return y.reshape(H * repeat * hd, *rest).movedim(0, dim)

    def inverse(self):
        return Invertible(torch.linalg.inv(self.A.double()).to(self.A.dtype))

    def compose(self, first):
        if not isinstance(first, Invertible):
            return _dense_compose(self, first)
        return Invertible(self.A @ first.A)

    @property
    def n(self):
        return self.A.shape[0] * self.A.shape[1]

    m = n

    @staticmethod
    def identity(H, hd):
        return Invertible(torch.eye(hd).repeat(H, 1, 1))

    why = "invertible maps act only on the per-head qk and ov spaces"

    @classmethod
    def draw(cls, space, generator=None):
        kind = Rotary if space.rotary else Invertible
        return kind.random(space.blocks, space.size // space.blocks, generator=generator)

    @classmethod
    def neutral(cls, space):
        return (Rotary if space.rotary else Invertible).identity(space.blocks, space.size // space.blocks)

    def validate(self, space, state, spec):
        if space.rotary and not (isinstance(self, Rotary) or commutes_with_rotary(self.A)):
            raise UnsupportedModelError(f"the per-head maps of {space.name!r} must commute with the rotary position "
                                        "embedding (one scaled 2 x 2 rotation per frequency pair, symmetries.Rotary); "
                                        "a general invertible map would change the attention scores")

    def compare(self, other):
        if not isinstance(other, Invertible):
            raise TypeError(f"cannot compare {type(self).__name__} with {type(other).__name__}")
        return {"class": "inv", "rel": _rel(other.A, self.A)}

    @classmethod
    def to_parameter(cls, T, space):
        """The blocks themselves; under rotary embeddings (log scale, angle) per frequency pair."""
        if space.rotary:
            R = T if isinstance(T, Rotary) else Rotary.nearest(T.A.detach().float())
            return {"": torch.stack([R.scale.float().log(), R.angle.float()]).clone()}
        return {"": T.A.detach().float().clone()}

    @classmethod
    def from_parameter(cls, tensors, space, hard=False):
        S = tensors[""].detach().clone() if hard else tensors[""]
        return Rotary(S[0].exp(), S[1]) if space.rotary else Invertible(S)

    @staticmethod
    def random(H, hd, generator=None, cond=4.0):
        """Well-conditioned: U diag(s) V^T with Haar U, V and s log-uniform in [1/sqrt(cond), sqrt(cond)]."""
        U = torch.stack([_haar(hd, hd, generator) for _ in range(H)])
        V = torch.stack([_haar(hd, hd, generator) for _ in range(H)])
        s = ((torch.rand(H, hd, generator=generator) - 0.5) * math.log(cond)).exp()
        return Invertible(U @ torch.diag_embed(s) @ V.transpose(-1, -2))


class Rotary(Invertible):
    """Per-block maps that commute with rotary position embeddings: one scaled 2 x 2 rotation per
    frequency pair. Hugging Face's ``rotate_half`` pairs coordinate i with i + hd/2 (frequency
    theta_i) and rotates the pair by R(m theta_i) at position m. A query map A and key map A^-T
    keep every score q^T R_m^T R_n k iff A^T commutes with every R(delta theta_i); with distinct
    frequencies that is A = s_i R(phi_i) on each pair (the matrices commuting with a rotation are
    a I + b J), so A^-T = R(phi_i) / s_i: hd parameters per block instead of hd^2.

    Inputs: scale [H, hd/2] > 0, angle [H, hd/2] (radians). A subclass of :class:`Invertible`
    (the same class, restricted), so it composes, inverts and applies like one."""

    def __init__(self, scale, angle):
        self.scale, self.angle = scale, angle
        c, s = angle.cos() * scale, angle.sin() * scale          # (H, P)
        D = torch.diag_embed
        A = torch.cat([torch.cat([D(c), D(-s)], -1), torch.cat([D(s), D(c)], -1)], -2)  # (H, hd, hd)
        super().__init__(A)

    def inv_t(self):
        """A^-T = R(phi) / s per pair, in closed form."""
        return Rotary(1.0 / self.scale, self.angle).A

    def inverse(self):
        return Rotary(1.0 / self.scale, -self.angle)

    def compose(self, first):
        if isinstance(first, Rotary):
            return Rotary(self.scale * first.scale, self.angle + first.angle)
        return super().compose(first)

    @staticmethod
    def identity(H, hd):
        return Rotary(torch.ones(H, hd // 2), torch.zeros(H, hd // 2))

    @staticmethod
    def random(H, hd, generator=None, max_scale=2.0):
        """Scales log-uniform in [1/max_scale, max_scale], angles uniform in [-pi, pi)."""
        log_s = (torch.rand(H, hd // 2, generator=generator) * 2 - 1) * math.log(max_scale)
        angle = (torch.rand(H, hd // 2, generator=generator) * 2 - 1) * math.pi
        return Rotary(log_s.exp(), angle)

    @staticmethod
    def nearest(A):
        """The scaled rotations closest (Frobenius, per pair) to A [H, hd, hd]'s 2 x 2 pair blocks:
        a I + b J with a = (A_ii + A_jj) / 2, b = (A_ji - A_ij) / 2 (j = i + hd/2)."""
        P = A.shape[-1] // 2
        i = torch.arange(P, device=A.device)
        a = (A[:, i, i] + A[:, i + P, i + P]) / 2
        b = (A[:, i + P, i] - A[:, i, i + P]) / 2
        return Rotary(torch.hypot(a, b).clamp_min(1e-12), torch.atan2(b, a))


def commutes_with_rotary(A, atol=1e-5):
    """Is every block of A [H, hd, hd] a scaled rotation on each (i, i + hd/2) pair and zero elsewhere?"""
    R = Rotary.nearest(A).A.to(A)
    return bool(torch.allclose(A, R, atol=atol * max(1.0, float(A.abs().max()))))


def _sources(T):
    return T.perm if isinstance(T, Permutation) else T.src


def _compare_units(Ta, Tb):
    """Fraction of units sent elsewhere (and, for semi-permutations, the relative scale change)."""
    sa, sb = _sources(Ta).cpu(), _sources(Tb).cpu()
    if sa.shape != sb.shape:
        raise ValueError(f"unit maps of different sizes: {len(sa)} and {len(sb)}")
    out = {"class": "perm", "changed": float((sa != sb).float().mean())}
    if isinstance(Ta, SemiPermutation) or isinstance(Tb, SemiPermutation):
        out["class"] = "semi"
        out["scale_rel"] = _rel(Tb.out_matrix(), Ta.out_matrix())
    return out


def eigen_angles(O):
    """|angle| of each eigenvalue of an orthogonal O [n, n], in radians, sorted ascending.

    Eigenvalues of a real orthogonal map come in pairs e^{±i theta} (and ±1), so each rotation
    plane contributes its angle twice; the identity gives n zeros. Computed in float64.
    """
    ev = torch.linalg.eigvals(torch.as_tensor(O).detach().double().cpu())
    return torch.sort(torch.angle(ev).abs()).values


def _compare_orthogonal(Oa, Ob):
    """Eigen-angles of the correction O_b O_a^T taking solution a to solution b, and ||O_b - O_a||_F."""
    Oa, Ob = Oa.detach().double().cpu(), Ob.detach().double().cpu()
    angles = eigen_angles(Ob @ Oa.T)
    return {"class": "orth", "angles": angles, "max_angle": float(angles.max()),
            "mean_angle": float(angles.mean()), "fro": float((Ob - Oa).norm())}


def _rel(B, A):
    A, B = A.detach().double().cpu(), B.detach().double().cpu()
    return float((B - A).norm() / A.norm().clamp_min(1e-30))


def _dense_compose(second, first):
    raise TypeError(f"cannot compose {type(second).__name__} after {type(first).__name__}: "
                    "they belong to different classes")


# --------------------------------------------------------------------------- on whole models

CLASSES = {"perm": Permutation, "semi": SemiPermutation, "orth": Orthogonal, "inv": Invertible}


def class_for(space, symmetries):
    """The class that acts on ``space`` given the allowed ``symmetries``: the richest of the space's
    classes among them -- invertible on qk / ov, orthogonal where allowed (the residual stream),
    semi-permutations on FFN / hidden units, else permutations -- or None. The one rule used to draw
    random elements, to start and run weight matching and to set up learned matching."""
    allowed = [c for c in space.classes if c in symmetries]
    if space.kind in ("qk", "ov"):
        return "inv" if "inv" in allowed else None
    if "orth" in allowed:
        return "orth"
    if "semi" in allowed and space.kind in ("ffn", "hidden"):
        return "semi"
    if ("perm" in symmetries or "semi" in symmetries) and ({"perm", "semi"} & set(space.classes)):
        return "perm"
    return None


def identity_transforms(spec):
    """The identity element on every space (per-head maps on qk / ov, permutations elsewhere)."""
    return {name: (Invertible if s.kind in ("qk", "ov") else Permutation).neutral(s) for name, s in spec.spaces.items()}


def random_transforms(spec, symmetries=("perm", "semi", "orth", "inv"), seed=0):
    """A random element of the richest allowed class on each space (same widths), :func:`class_for`.

    Residual: orthogonal (fixing the all-ones direction where the norms are LayerNorms; needs a
    canonical model), else a permutation. FFN/hidden: a scaled permutation if "semi" (ReLU or
    SwiGLU), else a permutation. Heads: a permutation (within key-value groups for query heads).
    qk/ov: well-conditioned per-head invertible maps if "inv" (scaled rotations under rotary).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in spec.spaces.items():
        c = class_for(s, symmetries)
        if c is not None:
            out[name] = CLASSES[c].draw(s, g)
    return out


def _heads_space(name):
    """The heads space whose permutation acts after the per-head maps of ``name`` ("qk.3" -> "heads.3")."""
    kind, _, layer = name.partition(".")
    return f"heads.{layer}" if kind in ("qk", "ov", "qheads") else None


def _head_order(P):
    """The head order of a heads transform that only reorders heads, else None."""
    if isinstance(P, Permutation):
        return P.perm
    if isinstance(P, SemiPermutation) and P.m == P.n and len(set(P.src.tolist())) == P.n:
        return P.src
    return None


def _per_head(T, heads, name, inverse):
    """Re-index the per-head blocks of ``T`` (qk/ov) across the heads map acting after the per-head maps.

    Along a q/k/v axis a transform set acts as ``P A`` (A block-diagonal, then the heads order P), so
    ``P2 A2 P1 A1 = (P2 P1) (P1^-1 A2 P1) A1`` and ``(P A)^-1 = P^-1 (P A^-1 P^-1)``. The same
    holds for a permutation Q of query heads within their key-value groups (qheads), with P the
    group order acting on whole groups of query heads."""
    if heads is not None and name.startswith("qheads.") and isinstance(T, Permutation):
        return _query_heads_across(T, heads, name, inverse)
    if heads is None or not isinstance(T, Invertible):
        return T
    order = _head_order(heads)
    if order is None:
        if torch.equal(T.A, torch.eye(T.A.shape[-1], dtype=T.A.dtype, device=T.A.device).expand_as(T.A)):
            return T
        raise ValueError(f"cannot move the per-head maps of {name!r} across a head-splitting map")
    order = order.to(T.A.device)
    idx = order if inverse else torch.argsort(order)
    return Rotary(T.scale[idx], T.angle[idx]) if isinstance(T, Rotary) else Invertible(T.A[idx])


def _query_heads_across(Q, heads, name, inverse):
    """Q (query heads, within groups) moved across the group order P: as query-head index maps,
    P Q P^-1 (compose) or P^-1 Q P (inverse), so that (P2 Q2)(P1 Q1) = (P2 P1)(P1^-1 Q2 P1 Q1)."""
    order = _head_order(heads)
    if order is None:
        raise ValueError(f"cannot move the query-head order of {name!r} across a head-splitting map")
    G, H = len(order), len(Q.perm)
    r = H // G
    P = (order.cpu()[:, None] * r + torch.arange(r)).reshape(-1)  # group order as a map of query heads
    P_inv = torch.argsort(P)
    perm = Q.perm.cpu()
    return Permutation(P_inv[perm[P]] if inverse else P[perm[P_inv]])


def compose_transforms(second, first):
    """Space-wise ``second ∘ first`` (first applied first); a space missing in one is the identity there.

    Applying the result equals applying ``first`` and then ``second``: per-head maps (qk, ov) of
    ``second`` are re-indexed by ``first``'s head permutation of the same layer."""
    out = dict(first)
    for name, T in second.items():
        T = _per_head(T, first.get(_heads_space(name)), name, inverse=False)
        out[name] = T.compose(first[name]) if name in first else T
    return out


def invert_transforms(transforms):
    """Space-wise inverse: applying ``transforms`` and then the result gives back the parameters."""
    out = {}
    for name, T in transforms.items():
        out[name] = _per_head(T.inverse(), transforms.get(_heads_space(name)), name, inverse=True)
    return out


def _resizable(spec, kind):
    """Whether a transform may change the width of a space of ``kind`` (``Family.resizable``): FFN /
    hidden units on a stock model (``apply_transforms`` resizes its Linear layers); any space of a
    model that resizes itself (None: a circuit model's ``resize_to``)."""
    from .families import Family, by_name
    try:
        kinds = by_name(spec.family).resizable
    except ValueError:  # a table of no registered family: the stock rule
        kinds = Family.resizable
    return kinds is None or kind in kinds


def _check_transform(space, T, state, spec):
    """What every element must satisfy on ``space`` (its class allowed there, its size, no width
    change where the family forbids it, permutations inside the blocks of a block-structured
    space), then its class's own rules (:meth:`Transform.validate`)."""
    permutation = T.cls == "perm" or T.is_permutation()
    if not permutation and T.cls not in space.classes:
        raise UnsupportedModelError(f"a {type(T).__name__} cannot act on space {space.name!r}: {CLASSES[T.cls].why}")
    if T.n != space.size or (isinstance(T, Invertible) and T.A.shape[0] != space.blocks):
        raise ValueError(f"a {type(T).__name__} of {T.n} units cannot act on space {space.name!r} of "
                         f"{space.size} units" + (f" in {space.blocks} blocks" if space.blocks > 1 else ""))
    if T.m != T.n and not _resizable(spec, space.kind):
        raise UnsupportedModelError(f"a {type(T).__name__} {T.n} -> {T.m} cannot change the width of space "
                                    f"{space.name!r} of a stock model: only FFN / hidden layers can be resized")
    if permutation and space.blocks > 1:  # block-diagonal spaces: entries must stay in their block
        src = T.perm if isinstance(T, Permutation) else T.src
        unit = space.size // space.blocks
        if not torch.equal(src.cpu() // unit, torch.arange(len(src)) // unit):
            raise UnsupportedModelError(f"a permutation of space {space.name!r} moves entries between heads; "
                                        "per-head maps keep every entry in its head (reorder whole heads "
                                        "with the heads space)")
    if not permutation:
        T.validate(space, state, spec)


def _check_residual(space, T, state, spec):
    if isinstance(T, Orthogonal) and space.fix_ones and not T.fixes_ones():
        raise UnsupportedModelError("an orthogonal map of the residual stream must fix the all-ones direction "
                                    "(O 1 = 1) to commute with LayerNorm; see Orthogonal.random / ones_complement")
    for p, axes in spec.axes.items():
        gains = p.endswith(".weight") or p.endswith(".gamma")
        if gains and any(ax and ax[0].chain[0][1] in ("norm", "gain") for ax in axes):
            g = state[p]
            if not torch.allclose(g, torch.ones_like(g), atol=1e-6):
                raise UnsupportedModelError(f"{p} is not 1: an orthogonal map of the residual stream needs the "
                                            "canonical form; call gm.canonicalize(model) first")


def transform_state(state, spec, transforms, check=True):
    """Apply ``transforms`` (space name -> Transform) to a state dict; returns a new dict.

    For each parameter and each axis, each segment's chain of (space, role) is applied in order:
    ``x_seg -> R_k ... R_1 x_seg`` with R = out/in/norm matrix of the space's transform
    (kron with I_unit for heads). Differentiable in the transforms' tensors.
    """
    if check:
        for name, T in transforms.items():
            if name not in spec.spaces:
                raise KeyError(f"unknown space {name!r}; the model has {sorted(spec.spaces)}")
            _check_transform(spec.spaces[name], T, state, spec)
    out = dict(state)
    for p, axes in spec.axes.items():
        if p not in state:
            continue
        x = state[p]
        for dim, segments in enumerate(axes):
            if segments and any(transforms.get(s) is not None for seg in segments for s, _ in seg.chain):
                x = _transform_axis(x, dim, segments, spec, transforms)
        out[p] = x
    return out


def _transform_axis(x, dim, segments, spec, transforms):
    pieces, end = [], 0
    for seg in sorted(segments, key=lambda s: s.start):
        if seg.start > end:  # entries no segment covers stay as they are
            pieces.append(x.narrow(dim, end, seg.start - end))
        end = seg.stop
        y = x.narrow(dim, seg.start, seg.stop - seg.start)
        for space_name, role in seg.chain:
            T = transforms.get(space_name)
            if T is None or (role == "gain" and not T.is_permutation()):
                continue  # an all-ones RMSNorm gain: every orthogonal map leaves it as it is
            space = spec.spaces[space_name]
            y = T.apply(y, dim, role, unit=seg.unit_of(space_name, space.unit), blocks=space.blocks,
                        repeat=seg.repeat_of(space_name))
        pieces.append(y)
    if end < x.shape[dim]:
        pieces.append(x.narrow(dim, end, x.shape[dim] - end))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def apply_transforms(model, transforms, spec=None):
    """A copy of ``model`` with ``transforms`` applied; same function, same stock class.

    Inputs: model (untouched), transforms {space name: Transform}. Widths may change only where
    the class allows it (a semi-permutation widening an FFN/hidden layer); the copy is then
    resized module by module.
    """
    spec = spec or build_spec(model)
    with torch.no_grad():
        state = transform_state(dict(model.state_dict()), spec, transforms)
    new = copy.deepcopy(model)
    _resize_to(new, state)
    new.load_state_dict(state)
    return new


def _resize_to(model, state):
    """Replace Linear / Conv1D modules whose parameter shapes differ from ``state``."""
    if hasattr(model, "resize_to"):  # the circuit module knows its own head counts
        return model.resize_to(state)
    own = model.state_dict()
    changed = {k.rsplit(".", 1)[0] for k, v in state.items() if k in own and own[k].shape != v.shape}
    for mod_name in changed:
        parent_name, _, attr = mod_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        w = state[f"{mod_name}.weight"]
        setattr(parent, attr, _resized_module(old, w, mod_name))
    if getattr(model, "config", None) is not None and hasattr(model.config, "n_inner"):
        f = {state[k].shape[1] for k in state if k.endswith("mlp.c_fc.weight")}
        if len(f) == 1:
            model.config.n_inner = f.pop()


def empty_module(build, device=None, dtype=None):
    """``build()`` without its random initialisation: made on the meta device, then given empty
    storage on ``device`` in ``dtype``. Every caller loads the values afterwards, and the caller's
    global RNG is not consumed (a fresh nn.Linear would draw its init from it)."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device=device or "cpu").to(dtype=dtype)


def _resized_module(old, w, name):
    if isinstance(old, torch.nn.Linear):
        build = lambda: torch.nn.Linear(w.shape[1], w.shape[0], bias=old.bias is not None)
    elif type(old).__name__ == "Conv1D":
        build = lambda: type(old)(w.shape[1], w.shape[0])
    else:
        raise UnsupportedModelError(f"cannot change the width of {name} ({type(old).__name__})")
    return empty_module(build, w.device, w.dtype)
