"""The canonical transformer module: attention heads as circuits (the paper's form), or as
factors with any number of heads per layer.

A head of a pre-norm transformer reads the bias-augmented normalised stream
x̃ = [LN(x); 1] (length d + 1) and depends on its four factors only through two products:

    logits_ij = scale * x̃_i^T QK x̃_j,     QK = Q̃ K̃^T   [d+1, d+1],  Q̃ = [W_q^T; b_q^T]  [d+1, hd]
    output_i  = sum_j softmax_j(logits_i) x̃_j^T OV,     OV = Ṽ W_o^T  [d+1, d],   Ṽ = [W_v^T; b_v^T]

The value bias may stay inside Ṽ because softmax rows sum to 1: sum_j a_ij b_v^T W_o^T = b_v^T W_o^T.
Any invertible A on the head dimension cancels in both products (Q̃ A)(K̃ A^-T)^T = Q̃ K̃^T, so the
circuit form has no invertible freedom left: two models that differ by per-head invertible maps
have identical circuits. What remains acts on the circuits as

    residual O (orthogonal, O 1 = 1):   QK -> Õ QK Õ^T,  OV -> Õ OV O^T,   Õ = diag(O, 1)
    heads (permutation):                reorder axis 0 of QK and OV
    heads (splitting, semi-permutation): a head becomes copies with the same QK and OV * share,
                                         shares of one head summing to 1 (exact: same softmax).

Everything else is kept in canonical form (``canonical``): centred writers and LayerNorms with
gain 1, of which only the biases remain (F.layer_norm with weight=None).

A layer stores either circuits (``qk`` [H, d+1, d+1], ``ov`` [H, d+1, d]; the default of
:func:`to_circuit`) or augmented factors (``wq``, ``wk``, ``wv`` [d+1, H*hd], ``wo`` [H*hd, d]),
with any head count per layer (:func:`split_heads`). Interpolating two such models of equal shapes
state-dict-wise is the paper's merge in circuit form. Introduced in chapter 4.
"""
import copy
import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .canonical import canonicalize
from .families import by_name, detect
from .spaces import Segment, Space, Spec, UnsupportedModelError, _activation_name, _ffn_classes, _whole
from .symmetries import SemiPermutation, empty_module, transform_state

FORMS = ("circuit", "factored")


# --------------------------------------------------------------------------- modules

def _augment(h):
    """x -> [x; 1] along the last axis: (B, T, d) -> (B, T, d+1)."""
    return torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1)


def _softmax(logits, causal):
    """Row softmax of (B, H, T, T) logits; future positions masked when ``causal``."""
    if causal:
        T = logits.shape[-1]
        future = torch.ones(T, T, dtype=torch.bool, device=logits.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1)


class CircuitAttention(nn.Module):
    """Multi-head self-attention on x̃ = [LN(x); 1], heads stored as circuits or as factors.

    form "circuit":  qk [H, d+1, d+1], ov [H, d+1, d]
    form "factored": wq, wk, wv [d+1, H*hd] (last row = bias), wo [H*hd, d]
    Both: proj_bias [d]. ``scale`` multiplies the logits; ``causal`` masks the future.
    """

    def __init__(self, d, heads, form="circuit", head_dim=None, scale=1.0, causal=False,
                 device=None, dtype=None):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        kw = {"device": device, "dtype": dtype}
        self.d, self.form, self.scale, self.causal = d, form, float(scale), bool(causal)
        self.head_dim = None if form == "circuit" else int(head_dim)
        if form == "circuit":
            self.qk = nn.Parameter(torch.zeros(heads, d + 1, d + 1, **kw))
            self.ov = nn.Parameter(torch.zeros(heads, d + 1, d, **kw))
        else:
            D = heads * self.head_dim
            for name, shape in (("wq", (d + 1, D)), ("wk", (d + 1, D)), ("wv", (d + 1, D)), ("wo", (D, d))):
                setattr(self, name, nn.Parameter(torch.zeros(*shape, **kw)))
        self.proj_bias = nn.Parameter(torch.zeros(d, **kw))

    @property
    def num_heads(self):
        return self.qk.shape[0] if self.form == "circuit" else self.wq.shape[1] // self.head_dim

    def like(self, heads):
        """An empty layer of the same form, scale and mask with ``heads`` heads."""
        p = self.proj_bias
        return CircuitAttention(self.d, heads, self.form, self.head_dim, self.scale, self.causal,
                                device=p.device, dtype=p.dtype)

    def forward(self, xt):
        """xt (B, T, d+1) -> sum over heads of softmax(logits) @ values, plus the projection bias: (B, T, d)."""
        if self.form == "circuit":
            return self._circuit_forward(xt) + self.proj_bias
        return self._factored_forward(xt) + self.proj_bias

    def _circuit_forward(self, xt):
        left = torch.einsum("bti,hij->bhtj", xt, self.qk)            # (B, H, T, d+1) = x̃_i^T QK_h
        logits = self.scale * left @ xt.unsqueeze(1).transpose(-1, -2)  # (B, H, T, T)
        values = torch.einsum("bti,hio->bhto", xt, self.ov)         # (B, H, T, d) = x̃_j^T OV_h
        return (_softmax(logits, self.causal) @ values).sum(dim=1)  # (B, T, d)

    def _factored_forward(self, xt):
        B, T, _ = xt.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = ((xt @ w).view(B, T, H, hd).transpose(1, 2) for w in (self.wq, self.wk, self.wv))  # (B, H, T, hd)
        attn = _softmax(self.scale * q @ k.transpose(-1, -2), self.causal)  # (B, H, T, T)
        out = (attn @ v).transpose(1, 2).reshape(B, T, H * hd)             # (B, T, H*hd)
        return out @ self.wo

    def circuits(self):
        """(qk [H, d+1, d+1], ov [H, d+1, d]) of this layer, whatever its form (products in float64)."""
        if self.form == "circuit":
            return self.qk.detach(), self.ov.detach()
        return _circuits(self.wq, self.wk, self.wv, self.wo, self.num_heads)

    def extra_repr(self):
        hd = "" if self.form == "circuit" else f", head_dim={self.head_dim}"
        return f"d={self.d}, heads={self.num_heads}, form={self.form!r}{hd}, scale={self.scale:.4g}, causal={self.causal}"


def _circuits(wq, wk, wv, wo, H):
    """QK_h = Q̃_h K̃_h^T and OV_h = Ṽ_h W_o,h^T from augmented factors [d+1, H*hd] and wo [H*hd, d]."""
    dtype = wq.dtype
    q, k, v = (w.detach().double().reshape(w.shape[0], H, -1).transpose(0, 1) for w in (wq, wk, wv))  # (H, d+1, hd)
    o = wo.detach().double().reshape(H, -1, wo.shape[1])                                               # (H, hd, d)
    return (q @ k.transpose(-1, -2)).to(dtype), (v @ o).to(dtype)


class CircuitBlock(nn.Module):
    """Pre-norm block: x + attn([LN(x); 1]), then x + fc2(act(fc1(LN(x)))); LayerNorms have gain 1."""

    def __init__(self, attn, fc1, act, fc2, eps):
        super().__init__()
        d = attn.d
        self.ln1_bias = nn.Parameter(torch.zeros_like(attn.proj_bias))
        self.attn = attn
        self.ln2_bias = nn.Parameter(torch.zeros_like(attn.proj_bias))
        self.fc1, self.act, self.fc2 = fc1, act, fc2
        self.d, self.eps = d, eps

    def forward(self, x):
        """x (B, T, d) -> (B, T, d)."""
        x = x + self.attn(_augment(F.layer_norm(x, (self.d,), None, self.ln1_bias, self.eps)))
        h = F.layer_norm(x, (self.d,), None, self.ln2_bias, self.eps)
        return x + self.fc2(self.act(self.fc1(h)))


@dataclass
class CircuitConfig:
    """What the parameters' shapes do not say. ViT fields are ignored for GPT-2 and vice versa."""
    family: str                    # source family: "vit" | "gpt2"
    d: int                         # residual width
    eps: float                     # LayerNorm epsilon
    patch_size: tuple = (1, 1)     # ViT: conv kernel = stride
    no_embed_class: bool = False   # ViT: pos_embed covers the patches only
    pool: str = "token"            # ViT: "token" | "avg"
    pool_include_prefix: bool = False
    norm_site: str = "tokens"      # ViT: final LN before pooling ("tokens", timm norm) or after ("pooled", fc_norm)


class CircuitTransformer(nn.Module):
    """A pre-norm ViT classifier or GPT-2 language model with heads in circuit (or factored) form.

    ViT:   forward(x [B, C, H, W]) -> logits [B, classes]; parameters patch_weight, patch_bias,
           cls_token, reg_token, pos_embed (those the source has), blocks.*, norm_bias, head.
    GPT-2: forward(x [B, T] long) -> logits [B, T, V]; parameters wte, wpe, blocks.*, norm_bias, head.
    Build one with :func:`to_circuit` (or ``CircuitTransformer.from_stock``).
    """
    glmc_family = "circuit"

    def __init__(self, config, blocks, embeddings, head):
        super().__init__()
        self.config = config
        self.source_family = config.family
        self.glmc_kind = by_name(config.family).kind  # language: token embeddings; else image patches
        for name, tensor in embeddings.items():
            self.register_parameter(name, None if tensor is None else nn.Parameter(tensor))
        self.blocks = nn.ModuleList(blocks)
        self.norm_bias = nn.Parameter(torch.zeros_like(blocks[0].ln1_bias))
        self.head = head

    @classmethod
    def from_stock(cls, model, form="circuit"):
        """Alias of :func:`to_circuit`."""
        return to_circuit(model, form)

    @property
    def num_heads(self):
        """Head count per layer."""
        return [blk.attn.num_heads for blk in self.blocks]

    def _ln(self, x):
        return F.layer_norm(x, (self.config.d,), None, self.norm_bias, self.config.eps)

    def forward(self, x):
        language = self.glmc_kind == "language"
        h = self._embed_tokens(x) if language else self._embed_patches(x)  # (B, T, d)
        for blk in self.blocks:
            h = blk(h)
        if language:
            return self.head(self._ln(h))  # (B, T, V)
        return self.head(self._pool(h))    # (B, classes)

    def _embed_tokens(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.wte[ids] + self.wpe[pos]  # (B, T, d)

    def _embed_patches(self, img):
        c = self.config
        x = F.conv2d(img, self.patch_weight, self.patch_bias, stride=c.patch_size)  # (B, d, gh, gw)
        x = x.flatten(2).transpose(1, 2)                                           # (B, N, d)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and c.no_embed_class:
            x = x + self.pos_embed
        x = torch.cat(prefix + [x], dim=1)  # (B, prefix + N, d)
        if self.pos_embed is not None and not c.no_embed_class:
            x = x + self.pos_embed
        return x

    def _pool(self, h):
        c = self.config
        if c.norm_site == "tokens":
            h = self._ln(h)
        if c.pool == "token":
            h = h[:, 0]                                            # (B, d)
        else:
            n_prefix = sum(0 if t is None else t.shape[1] for t in (self.cls_token, self.reg_token))
            h = (h if c.pool_include_prefix else h[:, n_prefix:]).mean(dim=1)  # (B, d)
        return self._ln(h) if c.norm_site == "pooled" else h

    @property
    def scales(self):
        """Logit scale per layer."""
        return [blk.attn.scale for blk in self.blocks]

    def rescaled(self, scales):
        """A copy with logit scale ``scales`` (a float or one per layer), same function: QK (or wq) is
        multiplied by old / new. Interpolate only models with equal scales: after splitting the heads of
        a model with another head size, call ``b.rescaled(a.scales)``."""
        new = copy.deepcopy(self)
        scales = scales if isinstance(scales, (list, tuple)) else [scales] * len(self.blocks)
        with torch.no_grad():
            for blk, s in zip(new.blocks, scales):
                (blk.attn.qk if blk.attn.form == "circuit" else blk.attn.wq).mul_(blk.attn.scale / s)
                blk.attn.scale = float(s)
        return new

    def spec(self):
        """The space table of this model (see :func:`circuit_spec`)."""
        return circuit_spec(self)

    def resize_to(self, state):
        """Replace attention layers and FFN Linears whose shapes differ from ``state`` (in place)."""
        for l, blk in enumerate(self.blocks):
            p = f"blocks.{l}"
            key = f"{p}.attn.qk" if blk.attn.form == "circuit" else f"{p}.attn.wq"
            ref = blk.attn.qk if blk.attn.form == "circuit" else blk.attn.wq
            if state[key].shape != ref.shape:
                H = state[key].shape[0] if blk.attn.form == "circuit" else state[key].shape[1] // blk.attn.head_dim
                blk.attn = blk.attn.like(H)
            f = state[f"{p}.fc1.weight"].shape[0]
            if f != blk.fc1.out_features:
                blk.fc1, blk.fc2 = _linear_like(blk.fc1, out=f), _linear_like(blk.fc2, inp=f)
        return self

    def as_circuits(self):
        """A copy whose factored layers are converted to circuit form (same function)."""
        new = copy.deepcopy(self)
        for blk in new.blocks:
            if blk.attn.form == "factored":
                qk, ov = blk.attn.circuits()
                attn = CircuitAttention(blk.d, qk.shape[0], "circuit", scale=blk.attn.scale, causal=blk.attn.causal,
                                        device=qk.device, dtype=qk.dtype)
                attn.load_state_dict({"qk": qk, "ov": ov, "proj_bias": blk.attn.proj_bias.detach()})
                blk.attn = attn
        return new


def _linear_like(old, out=None, inp=None):
    """An uninitialised Linear like ``old`` with other sizes (filled by load_state_dict; no RNG drawn)."""
    p = old.weight
    return empty_module(lambda: nn.Linear(inp or old.in_features, out or old.out_features, bias=old.bias is not None),
                        p.device, p.dtype)


# --------------------------------------------------------------------------- the space table

def _aug_in(d, space="residual"):
    """An augmented axis [0:d] read against ``space``, entry d (the bias row) left untouched.

    symmetries._transform_axis concatenates only the segments it is given, so the untouched entry
    is spelled out as a segment with an empty chain."""
    return (Segment(0, d, ((space, "in"),)), Segment(d, d + 1, ()))


def circuit_spec(model):
    """Spec of a CircuitTransformer: the residual space, heads.l and ffn.l; qk.l / ov.l only on
    factored layers (circuits have no invertible freedom).

    residual (perm, orth): writers "out" (embeddings, ov columns, proj_bias, fc2), readers "in"
    (both axes of qk, rows 0:d of ov / wq / wk / wv, fc1, head), norm biases "norm".
    heads.l (perm, semi): circuit layers: axis 0 of qk ("out": copies duplicate) and of ov ("in":
    copies carry their share), unit 1; factored layers: as in the stock spec, unit head_dim.
    """
    d = model.config.d
    acts = {_activation_name(blk.act) for blk in model.blocks}
    spec = Spec("circuit", act="relu" if acts == {"relu"} else "gelu", invariant=("head.bias",))
    spec.add_space(Space("residual", "residual", d, ("perm", "orth"), fix_ones=True))
    R_out = _whole(d, ("residual", "out"))
    _embedding_axes(spec, model, R_out)
    for l, blk in enumerate(model.blocks):
        _block_axes(spec, f"blocks.{l}", blk, l, d, R_out)
    spec.set_axis("norm_bias", 0, 1, _whole(d, ("residual", "norm")))
    spec.set_axis("head.weight", 1, 2, _whole(d, ("residual", "in")))
    return spec


def _embedding_axes(spec, model, R_out):
    for name in ("patch_weight", "patch_bias", "cls_token", "reg_token", "pos_embed", "wte", "wpe"):
        t = getattr(model, name, None)
        if t is not None:
            dim = 0 if name.startswith("patch") else t.dim() - 1
            spec.set_axis(name, dim, t.dim(), R_out)


def _block_axes(spec, p, blk, l, d, R_out):
    R_norm = _whole(d, ("residual", "norm"))
    spec.set_axis(f"{p}.ln1_bias", 0, 1, R_norm)
    spec.set_axis(f"{p}.ln2_bias", 0, 1, R_norm)
    spec.set_axis(f"{p}.attn.proj_bias", 0, 1, R_out)
    if blk.attn.form == "circuit":
        _circuit_axes(spec, f"{p}.attn", blk.attn, l, d, R_out)
    else:
        _factored_axes(spec, f"{p}.attn", blk.attn, l, d, R_out)
    f = blk.fc1.out_features
    ffn = spec.add_space(Space(f"ffn.{l}", "ffn", f, _ffn_classes(_activation_name(blk.act)), layer=l))
    spec.set_axis(f"{p}.fc1.weight", 0, 2, _whole(f, (ffn, "out")))
    spec.set_axis(f"{p}.fc1.weight", 1, 2, _whole(d, ("residual", "in")))
    spec.set_axis(f"{p}.fc2.weight", 0, 2, R_out)
    spec.set_axis(f"{p}.fc2.weight", 1, 2, _whole(f, (ffn, "in")))
    if blk.fc1.bias is not None:
        spec.set_axis(f"{p}.fc1.bias", 0, 1, _whole(f, (ffn, "out")))
    if blk.fc2.bias is not None:
        spec.set_axis(f"{p}.fc2.bias", 0, 1, R_out)


def _circuit_axes(spec, p, attn, l, d, R_out):
    H = attn.num_heads
    heads = spec.add_space(Space(f"heads.{l}", "heads", H, ("perm", "semi"), unit=1, layer=l))
    spec.set_axis(f"{p}.qk", 0, 3, _whole(H, (heads, "out")))
    spec.set_axis(f"{p}.qk", 1, 3, _aug_in(d))
    spec.set_axis(f"{p}.qk", 2, 3, _aug_in(d))
    spec.set_axis(f"{p}.ov", 0, 3, _whole(H, (heads, "in")))
    spec.set_axis(f"{p}.ov", 1, 3, _aug_in(d))
    spec.set_axis(f"{p}.ov", 2, 3, R_out)


def _factored_axes(spec, p, attn, l, d, R_out):
    H, hd = attn.num_heads, attn.head_dim
    D = H * hd
    heads = spec.add_space(Space(f"heads.{l}", "heads", H, ("perm", "semi"), unit=hd, layer=l))
    qk = spec.add_space(Space(f"qk.{l}", "qk", D, ("inv",), blocks=H, layer=l))
    ov = spec.add_space(Space(f"ov.{l}", "ov", D, ("inv",), blocks=H, layer=l))
    for name, chain in (("wq", ((qk, "out"), (heads, "out"))), ("wk", ((qk, "in"), (heads, "out"))),
                        ("wv", ((ov, "out"), (heads, "out")))):
        spec.set_axis(f"{p}.{name}", 0, 2, _aug_in(d))
        spec.set_axis(f"{p}.{name}", 1, 2, (Segment(0, D, chain),))
    spec.set_axis(f"{p}.wo", 0, 2, (Segment(0, D, ((ov, "in"), (heads, "in"))),))
    spec.set_axis(f"{p}.wo", 1, 2, R_out)


# --------------------------------------------------------------------------- from stock models

def _aug_factors(w_in_out, bias, w_o_in_out):
    """Augmented factors from a qkv map stored [d, 3D] (input-major) and its bias [3D] (or None).

    Returns wq, wk, wv [d+1, D] (last row = bias) and wo [D, d]."""
    D = w_in_out.shape[1] // 3
    b = torch.zeros(3 * D, dtype=w_in_out.dtype, device=w_in_out.device) if bias is None else bias
    aug = torch.cat([w_in_out, b[None]], dim=0)  # (d+1, 3D)
    return aug[:, :D], aug[:, D:2 * D], aug[:, 2 * D:], w_o_in_out


def _attention_layer(factors, proj_bias, H, scale, causal, form, d):
    """A CircuitAttention holding ``factors`` (wq, wk, wv, wo) in ``form``."""
    wq, wk, wv, wo = (w.detach() for w in factors)
    hd = wq.shape[1] // H
    attn = CircuitAttention(d, H, form, hd, scale, causal, device=wq.device, dtype=wq.dtype)
    pb = torch.zeros(d, dtype=wq.dtype, device=wq.device) if proj_bias is None else proj_bias.detach()
    if form == "circuit":
        qk, ov = _circuits(wq, wk, wv, wo, H)
        state = {"qk": qk, "ov": ov}
    else:
        state = {"wq": wq, "wk": wk, "wv": wv, "wo": wo}
    attn.load_state_dict({**state, "proj_bias": pb})
    return attn


def _bias_of(norm):
    b = getattr(norm, "bias", None)
    return torch.zeros(norm.normalized_shape) if b is None else b  # no bias (or no affine): zeros


def _block(attn, norm1, norm2, fc1, act, fc2, eps):
    """A CircuitBlock from canonical stock parts (fc1 / fc2 as [out, in] Linears)."""
    blk = CircuitBlock(attn, fc1, copy.deepcopy(act), fc2, eps)
    with torch.no_grad():
        blk.ln1_bias.copy_(_bias_of(norm1))
        blk.ln2_bias.copy_(_bias_of(norm2))
    return blk


def _as_linear(weight_out_in, bias):
    """nn.Linear copying ``weight`` [out, in] and ``bias`` (no bias when None)."""
    out_f, in_f = weight_out_in.shape
    lin = empty_module(lambda: nn.Linear(in_f, out_f, bias=bias is not None), weight_out_in.device,
                       weight_out_in.dtype)  # no random init: the caller's RNG is left alone
    with torch.no_grad():
        lin.weight.copy_(weight_out_in)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _single_eps(norms):
    eps = {float(n.eps) for n in norms}
    if len(eps) != 1:
        raise UnsupportedModelError(f"LayerNorms with different eps {sorted(eps)}: the circuit module uses one")
    return eps.pop()


def to_circuit(model, form="circuit"):
    """A :class:`CircuitTransformer` computing the same function as the stock ``model``.

    Inputs: a timm VisionTransformer or HF GPT2LMHeadModel (never modified; any family with the
    ``to_circuit`` capability); it is canonicalised first (``canonical.canonicalize``), then its
    family converts it. ``form="circuit"`` stores each head as QK_h = Q̃_h K̃_h^T and
    OV_h = Ṽ_h W_o,h^T (products in float64, stored in the model's dtype); ``form="factored"``
    keeps the augmented factors. Follows the model's device and dtype.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    family = detect(model)
    if not family.supports("to_circuit"):
        family.to_circuit(model, form)  # refuses, naming the family
    canon = canonicalize(model)
    with torch.no_grad():
        new = family.to_circuit(canon, form)
    return new.train(model.training)


# --------------------------------------------------------------------------- transforms, head splitting

def apply_transforms(model, transforms):
    """``symmetries.apply_transforms`` for a CircuitTransformer: head counts and FFN widths may change.

    The stock ``apply_transforms`` resizes only Linear / Conv1D modules; here attention layers are
    resized too (``CircuitTransformer.resize_to``). Inputs: model (untouched), {space: Transform}.
    """
    with torch.no_grad():
        state = transform_state(dict(model.state_dict()), model.spec(), transforms)
    new = copy.deepcopy(model).resize_to(state)
    new.load_state_dict(state)
    return new


def random_head_split(H, m, generator=None):
    """A SemiPermutation from H heads to m >= H: every head kept, m - H extra copies of random heads,
    random positive shares summing to 1 per source head, scale 1 (heads admit no rescaling)."""
    if m < H:
        raise ValueError(f"cannot split {H} heads into fewer ({m}); splitting only adds heads")
    src = torch.cat([torch.arange(H), torch.randint(H, (m - H,), generator=generator)])
    src = src[torch.randperm(m, generator=generator)]
    raw = torch.rand(m, generator=generator) + 0.1
    share = raw / torch.zeros(H).index_add_(0, src, raw)[src]
    return SemiPermutation(src, torch.ones(m), share, n=H)


def _head_transforms(model, counts_or_transforms, seed):
    """{f"heads.{l}": SemiPermutation} from an int (every layer), a list (per layer) or a dict
    {layer (int or "heads.l"): int or SemiPermutation}."""
    from .checks import positive_int, seed_value
    L = len(model.blocks)
    spec = counts_or_transforms
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        spec = {l: spec for l in range(L)}
    elif isinstance(spec, (list, tuple)):
        spec = dict(enumerate(spec))
    if not isinstance(spec, dict):
        raise TypeError(f"split_heads takes a head count (int), a list of them per layer or a dict {{layer: count "
                        f"or SemiPermutation}}, got {counts_or_transforms!r} ({type(counts_or_transforms).__name__})")
    g = torch.Generator().manual_seed(seed_value(seed))
    out = {}
    for key, val in spec.items():
        l = int(key.split(".")[-1]) if isinstance(key, str) else int(key)
        if not 0 <= l < L:
            raise ValueError(f"layer {l} out of range: the model has {L} layers")
        H = model.blocks[l].attn.num_heads
        T = val if isinstance(val, SemiPermutation) else \
            random_head_split(H, positive_int(val, f"the head count of layer {l}"), g)
        if T.n != H:
            raise ValueError(f"the split of layer {l} acts on {T.n} heads; the layer has {H}")
        out[f"heads.{l}"] = T
    return out


def split_heads(model, counts_or_transforms, seed=0):
    """A CircuitTransformer whose layers have more heads, computing exactly the same function.

    Each head becomes copies that share its QK circuit (Q, K duplicated) and divide its OV circuit
    (OV * share, shares summing to 1): sum_k share_k softmax(QK) x̃ OV = softmax(QK) x̃ OV.
    Inputs: a CircuitTransformer (or a stock model, converted by :func:`to_circuit`);
    counts_or_transforms: an int target head count for every layer, a per-layer list, or a dict
    {layer: int | SemiPermutation over that layer's heads}; ints draw seeded random splits.
    """
    from .checks import seed_value
    seed_value(seed)
    if not isinstance(model, CircuitTransformer):
        model = to_circuit(model)
    return apply_transforms(model, _head_transforms(model, counts_or_transforms, seed))
