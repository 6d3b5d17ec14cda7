"""Embedding a narrow transformer into a wider one's spaces, computing exactly the same function.

Models of different widths cannot be interpolated directly. A narrow model (width d1, head size
hd1 = d1 / H, FFN width f1) is re-expressed in the shapes of a wide one (d2, hd2 = d2 / H, f2)
by maps of the symmetry classes that keep its function (Theus et al. 2025, "beyond two models"; chapter 5):

- residual: a rectangular orthogonal E [d2, d1] with E u1 = u2 (u the normalised all-ones
  vectors), so 1-perp goes into 1-perp. Writers get s E with s = sqrt(d2 / d1): a centred x keeps
  its per-coordinate RMS, ||s E x||^2 / d2 = ||x||^2 / d1, so LayerNorm with the *same eps* gives
  LN_wide(s E x) = s E LN_narrow(x); readers get W E^T / s and norm biases s E b (the
  ``Orthogonal`` class does out = s E, in = norm = E, which turns the unit gains into 1 / s; the
  final canonicalisation folds them into the readers);
- FFN: f2 - f1 units with zero in-weights, bias and out-weights (GELU(0) = ReLU(0) = 0);
- heads: the same head count, each head padded from hd1 to hd2 with zero query, key and value
  columns (and zero output-projection rows); the stock attention scales logits by hd^-1/2, so the
  query (weights and bias) is multiplied by sqrt(hd2 / hd1) to keep the logits.

The default E (``seed=None``) is deterministic: on centred vectors it is zero-padding,
E x = [x; 0]. A seed draws a Haar-random E instead (``Orthogonal.random(d1, d2)``).
The result is a stock model of the wide shape in canonical form, so ``gm.align(wide, embedded)``
works as for two models of one width. Introduced in chapter 5.
"""
import copy
import math

import torch
import torch.nn as nn

from .canonical import canonicalize
from .families import FAMILIES, detect
from .spaces import build_spec
from .symmetries import Orthogonal, ones_complement, transform_state


def residual_embedding(d1, d2, seed=None):
    """E [d2, d1] with orthonormal columns mapping the normalised ones vector of R^d1 to that of R^d2.

    seed=None: E = Q2[:, :d1-1] Q1^T + u2 u1^T with Helmert bases Q (E x = [x; 0] for centred x);
    else a Haar-random such map (seeded).
    """
    if seed is not None:
        from .checks import seed_value
        seed = seed_value(seed)
        return Orthogonal.random(d1, d2, generator=torch.Generator().manual_seed(seed))
    Q1, Q2 = ones_complement(d1), ones_complement(d2)
    E = Q2[:, :d1 - 1] @ Q1.T + torch.ones(d2, d1, dtype=torch.float64) / math.sqrt(d1 * d2)
    return Orthogonal(E.float())


# --------------------------------------------------------------------------- checks

def _layer_norms(model):
    return [m for m in model.modules() if isinstance(m, nn.LayerNorm)]


def _query_scales(narrow, wide, family):
    """Per layer, c with c * scale_wide = scale_narrow: sqrt(hd2 / hd1) for the stock hd^-1/2
    (the family's ``attention_logit_scale``)."""
    return [family.attention_logit_scale(narrow, l) / family.attention_logit_scale(wide, l)
            for l in range(len(family.blocks(narrow)))]


def _check(narrow, wide_like, spec_n, spec_w):
    """ValueError naming the first reason the narrow model cannot be embedded into the wide one."""
    if spec_n.family != spec_w.family:
        raise ValueError(f"models of different families: {spec_n.family} and {spec_w.family}")
    if not detect(narrow).supports("attention_logit_scale"):
        able = ", ".join(f.name for f in FAMILIES if f.supports("attention_logit_scale"))
        raise ValueError(f"embed_wider works on transformers ({able}), not {spec_n.family}")
    if any(s.rotary for s in spec_n.spaces.values()):
        raise ValueError(f"embed_wider does not widen {spec_n.family} models: with rotary embeddings the head size "
                         "sets the rotation frequencies (theta_i = base^(-2i/hd)), so padding heads would change them")
    depth_n, depth_w = len(spec_n.of_kind("ffn")), len(spec_w.of_kind("ffn"))
    if depth_n != depth_w:
        raise ValueError(f"models of different depths: {depth_n} and {depth_w} blocks")
    d1, d2 = spec_n.spaces["residual"].size, spec_w.spaces["residual"].size
    if d2 < d1:
        raise ValueError(f"the wide model (width {d2}) is narrower than the narrow one (width {d1})")
    for l in range(depth_n):
        H1, H2 = spec_n.spaces[f"heads.{l}"].size, spec_w.spaces[f"heads.{l}"].size
        if H1 != H2:
            raise ValueError(f"layer {l}: {H1} heads vs {H2}; stock models keep their head count. Split heads "
                             "first in circuit form: glmc_mini.circuit.split_heads(model, counts)")
        f1, f2 = spec_n.spaces[f"ffn.{l}"].size, spec_w.spaces[f"ffn.{l}"].size
        if f2 < f1:
            raise ValueError(f"layer {l}: the wide FFN ({f2} units) is narrower than the narrow one ({f1})")
    if spec_n.act != spec_w.act:
        raise ValueError(f"different FFN activations: {spec_n.act} and {spec_w.act}")
    eps_n, eps_w = [m.eps for m in _layer_norms(narrow)], [m.eps for m in _layer_norms(wide_like)]
    if eps_n != eps_w:
        raise ValueError(f"LayerNorm eps differ ({eps_n[0]} vs {eps_w[0]}): the embedding is exact only "
                         "with the same eps")


# --------------------------------------------------------------------------- padding

def _pad_heads(y, dim, H, hd2, scale):
    """Axis ``dim`` of H * hd1 entries -> H * hd2: each head's entries first, then zeros."""
    y = y.movedim(dim, 0)
    rest = y.shape[1:]
    y = y.reshape(H, -1, *rest)  # (H, hd1, ...)
    out = y.new_zeros(H, hd2, *rest)
    out[:, :y.shape[1]] = y * scale
    return out.reshape(H * hd2, *rest).movedim(0, dim)


def _pad_units(y, dim, n2):
    y = y.movedim(dim, 0)
    out = y.new_zeros(n2, *y.shape[1:])
    out[:y.shape[0]] = y
    return out.movedim(0, dim)


def _pad_segment(y, dim, seg, spec_n, spec_w, q_scale):
    space, role = seg.chain[0]
    kind, wide = spec_n.spaces[space].kind, spec_w.spaces[space]
    if kind == "ffn":
        return _pad_units(y, dim, wide.size)
    if kind in ("qk", "ov"):
        scale = q_scale[wide.layer] if (kind, role) == ("qk", "out") else 1.0
        return _pad_heads(y, dim, wide.blocks, wide.size // wide.blocks, scale)
    return y


def pad_state(state, spec_n, spec_w, q_scale):
    """FFN units and head dimensions padded with zeros to the wide spec's sizes; queries scaled."""
    out = dict(state)
    for p, axes in spec_n.axes.items():
        x = out[p]
        for dim, segments in enumerate(axes):
            if segments and spec_n.spaces[segments[0].chain[0][0]].kind != "residual":
                pieces = [_pad_segment(x.narrow(dim, s.start, s.stop - s.start), dim, s, spec_n, spec_w, q_scale)
                          for s in sorted(segments, key=lambda s: s.start)]
                x = torch.cat(pieces, dim)
        out[p] = x
    return out


# --------------------------------------------------------------------------- entry point

def _load_into(wide_like, state, family):
    """A copy of ``wide_like`` (untied by its family: GPT-2's lm_head) holding ``state``; shape
    mismatches named."""
    wide = family.untie(copy.deepcopy(wide_like))
    own = wide.state_dict()
    for k in own:
        if k not in state or state[k].shape != own[k].shape:
            got = tuple(state[k].shape) if k in state else "missing"
            raise ValueError(f"the models differ beyond width at {k}: {got} vs {tuple(own[k].shape)} "
                             "(vocabulary, classes, positions and patches must match)")
    wide.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    return wide


def embed_wider(narrow, wide_like, seed=None):
    """A stock model of ``wide_like``'s class and shapes computing exactly ``narrow``'s function.

    Inputs: narrow, a timm VisionTransformer or HF GPT2LMHeadModel of width d1 (untouched);
    wide_like, a model of the same family, depth and head count with width d2 >= d1 and FFN width
    f2 >= f1 (only its shapes and settings are used); seed, None for the deterministic residual
    embedding, else a seed for a random one (:func:`residual_embedding`).
    Returns the embedded model in canonical form (module docstring: s E, W E^T / s, s E b, zero
    padding, queries scaled by sqrt(hd2 / hd1)). Introduced in chapter 5.
    """
    if seed is not None:
        from .checks import seed_value
        seed_value(seed)
    spec_n, spec_w = build_spec(narrow), build_spec(wide_like)
    _check(narrow, wide_like, spec_n, spec_w)
    d1, d2 = spec_n.spaces["residual"].size, spec_w.spaces["residual"].size
    C = canonicalize(narrow)
    spec_c, family = build_spec(C), detect(C)
    q_scale = _query_scales(C, wide_like, family)
    E = residual_embedding(d1, d2, seed)
    with torch.no_grad():
        state = {k: v.double() if v.is_floating_point() else v for k, v in C.state_dict().items()}
        state = transform_state(state, spec_c, {"residual": Orthogonal(E.O.double())}, check=False)
        state = pad_state(state, spec_c, spec_w, q_scale)
    return canonicalize(_load_into(wide_like, state, family))
