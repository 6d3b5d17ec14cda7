"""The ViT family: timm's ``VisionTransformer`` (the class itself), pre-norm blocks, class token
or average pooling, a Linear head.

Spaces: residual (perm, orth fixing the ones direction), and per block heads.l, qk.l, ov.l (fused
qkv Linear, rows [q; k; v]) and ffn.l (timm ``Mlp``: fc1, act, fc2). Canonical form: LayerScale
gains folded into the writer before them, then the pre-norm canonical form (``prenorm``).
Introduced in chapter 1.
"""
import torch
import torch.nn as nn

from ..spaces import (Space, Spec, UnsupportedModelError, _activation_name, _attention_spaces, _ffn_classes,
                      _layer_norm_types, _linear, _norm, _require_identity, _stock_checks, _whole)
from . import _isinstance
from .prenorm import PreNormTransformer


def vit_spec(model):
    """The table of a timm ``VisionTransformer``: pre-norm blocks, class token or average pooling
    (:meth:`ViT.spec` adds the checks of the stock class)."""
    d = model.embed_dim
    spec = Spec("vit", invariant=("head.bias",))
    spec.add_space(Space("residual", "residual", d, ("perm", "orth"), fix_ones=True))
    R_out, R_in = _whole(d, ("residual", "out")), _whole(d, ("residual", "in"))
    _check_top(model)
    for p in ("cls_token", "reg_token", "pos_embed"):
        t = getattr(model, p, None)
        if isinstance(t, nn.Parameter):
            spec.set_axis(p, t.dim() - 1, t.dim(), R_out)
    spec.set_axis("patch_embed.proj.weight", 0, 4, R_out)
    if model.patch_embed.proj.bias is not None:
        spec.set_axis("patch_embed.proj.bias", 0, 1, R_out)
    acts = set()
    for l, blk in enumerate(model.blocks):
        acts.add(_block_axes(spec, f"blocks.{l}", blk, l, d, R_out, R_in))
    for name in ("norm", "fc_norm"):
        module = getattr(model, name)
        if isinstance(module, nn.LayerNorm):
            _norm(spec, name, module, d)
    if isinstance(model.head, nn.Linear):
        _linear(spec, "head", model.head, in_segments=R_in)
    spec.act = "relu" if acts == {"relu"} else "gelu"
    return spec


def _check_top(model):
    if model.global_pool not in ("token", "avg"):
        raise UnsupportedModelError(f"VisionTransformer global_pool={model.global_pool!r}: only 'token' and 'avg'")
    _require_identity("VisionTransformer", norm_pre=model.norm_pre, patch_drop=getattr(model, "patch_drop", None),
                      patch_embed_norm=getattr(model.patch_embed, "norm", None))
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError("VisionTransformer attn_pool (global_pool='map') is not supported")
    for name in ("norm", "fc_norm"):
        module = getattr(model, name)
        if not isinstance(module, (nn.LayerNorm, nn.Identity)):
            raise UnsupportedModelError(f"VisionTransformer.{name} is {type(module).__name__}; glmc_mini supports "
                                        "nn.LayerNorm")
    if not isinstance(model.norm, nn.LayerNorm) and not isinstance(model.fc_norm, nn.LayerNorm):
        raise UnsupportedModelError("VisionTransformer without a final norm: the head would read the raw "
                                    "residual stream, which has no orthogonal symmetry")
    if isinstance(model.head, nn.Identity):
        raise UnsupportedModelError("VisionTransformer without a head (num_classes=0): its output is the "
                                    "residual stream itself, so no transform of that stream keeps the function "
                                    "and the final norm has no reader to fold its gain into; give it a Linear head")
    if not isinstance(model.head, nn.Linear):
        raise UnsupportedModelError(f"VisionTransformer head {type(model.head).__name__}: only nn.Linear")


def _block_axes(spec, prefix, blk, l, d, R_out, R_in):
    from timm.models.vision_transformer import Block
    if type(blk) is not Block:
        raise UnsupportedModelError(f"{prefix} is {type(blk).__name__}; only timm's pre-norm Block is supported "
                                    "(post-norm and parallel blocks have no residual orthogonal symmetry)")
    attn, mlp = blk.attn, blk.mlp
    _require_identity(f"{prefix}.attn", q_norm=getattr(attn, "q_norm", None), k_norm=getattr(attn, "k_norm", None),
                      norm=getattr(attn, "norm", None))
    from timm.layers import Mlp
    if type(mlp) is not Mlp:
        raise UnsupportedModelError(f"{prefix}.mlp is {type(mlp).__name__}; only timm's Mlp (fc1, act, fc2)")
    _require_identity(f"{prefix}.mlp", norm=getattr(mlp, "norm", None))
    H = attn.num_heads
    hd = attn.qkv.out_features // (3 * H)
    qkv, proj_in = _attention_spaces(spec, l, H, hd)
    _norm(spec, f"{prefix}.norm1", blk.norm1, d)
    _norm(spec, f"{prefix}.norm2", blk.norm2, d)
    _linear(spec, f"{prefix}.attn.qkv", attn.qkv, out_segments=qkv, in_segments=R_in)
    _linear(spec, f"{prefix}.attn.proj", attn.proj, out_segments=R_out, in_segments=proj_in)
    for ls in ("ls1", "ls2"):
        if hasattr(getattr(blk, ls), "gamma"):
            spec.set_axis(f"{prefix}.{ls}.gamma", 0, 1, _whole(d, ("residual", "norm")))
    act = _activation_name(mlp.act, f"{prefix}.mlp.act")
    f = mlp.fc1.out_features
    ffn = spec.add_space(Space(f"ffn.{l}", "ffn", f, _ffn_classes(act), layer=l))
    _linear(spec, f"{prefix}.mlp.fc1", mlp.fc1, out_segments=_whole(f, (ffn, "out")), in_segments=R_in)
    _linear(spec, f"{prefix}.mlp.fc2", mlp.fc2, out_segments=R_out, in_segments=_whole(f, (ffn, "in")))
    return act


def _module_types():
    from timm.layers import DropPath, Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, LayerScale
    return (PatchEmbed, nn.Conv2d, nn.Identity, nn.Dropout, DropPath, nn.Sequential, nn.ModuleList, Block,
            Attention, LayerScale, Mlp, nn.Linear) + _layer_norm_types()


def _fold_layerscale(model):
    """ls.gamma -> 1, folded into the writer before it (attn.proj, mlp.fc2): rows and bias times gamma."""
    for blk in model.blocks:
        for ls, writer in (("ls1", blk.attn.proj), ("ls2", blk.mlp.fc2)):
            gamma = getattr(getattr(blk, ls), "gamma", None)
            if gamma is not None:
                writer.weight.mul_(gamma[:, None])
                if writer.bias is not None:
                    writer.bias.mul_(gamma)
                gamma.fill_(1.0)


def _detach(t):
    return None if t is None else t.detach()


class ViT(PreNormTransformer):
    """timm ``VisionTransformer``; presets: class token, token pooling, no dropout."""
    name, kind = "vit", "classification"
    what = "timm VisionTransformer"

    def claims(self, model):
        return _isinstance(model, "timm.models.vision_transformer", "VisionTransformer")

    def spec(self, model):
        from timm.models.vision_transformer import VisionTransformer
        return _stock_checks(model, vit_spec(model), _module_types(), VisionTransformer)

    def blocks(self, model):
        return list(model.blocks)

    def norm_readers(self, model):
        pairs = [(f"blocks.{l}.norm1", [f"blocks.{l}.attn.qkv"]) for l in range(len(model.blocks))]
        pairs += [(f"blocks.{l}.norm2", [f"blocks.{l}.mlp.fc1"]) for l in range(len(model.blocks))]
        final = "norm" if isinstance(model.norm, nn.LayerNorm) else "fc_norm"
        pairs.append((final, ["head"] if isinstance(model.head, nn.Linear) else []))
        return pairs

    def prepare(self, model):
        _fold_layerscale(model)

    def attention_logit_scale(self, model, layer):
        """timm's ``Attention.scale`` (head_dim ** -0.5)."""
        return float(model.blocks[layer].attn.scale)

    def to_circuit(self, model, form="circuit"):
        """Canonical VisionTransformer -> CircuitTransformer (patch conv, tokens, pooling kept)."""
        from ..circuit import CircuitConfig, CircuitTransformer, _as_linear, _bias_of, _single_eps
        m = model
        if m.dynamic_img_size or getattr(m.patch_embed, "dynamic_img_pad", False):
            raise UnsupportedModelError("VisionTransformer with dynamic_img_size / dynamic_img_pad is not supported")
        conv = m.patch_embed.proj
        if tuple(conv.stride) != tuple(conv.kernel_size) or any(conv.padding) or conv.groups != 1:
            raise UnsupportedModelError("patch_embed.proj must be a non-overlapping, unpadded convolution")
        final = m.norm if isinstance(m.norm, nn.LayerNorm) else m.fc_norm
        norms = [final] + [n for b in m.blocks for n in (b.norm1, b.norm2)]
        config = CircuitConfig("vit", m.embed_dim, _single_eps(norms), tuple(conv.kernel_size),
                               bool(m.no_embed_class), m.global_pool, bool(m.pool_include_prefix),
                               "tokens" if isinstance(m.norm, nn.LayerNorm) else "pooled")
        embeddings = {"patch_weight": conv.weight.detach(), "patch_bias": _detach(conv.bias),
                      "cls_token": _detach(m.cls_token), "reg_token": _detach(m.reg_token),
                      "pos_embed": _detach(m.pos_embed)}
        head = _as_linear(m.head.weight.detach(), _detach(m.head.bias))
        circuit = CircuitTransformer(config, self._circuit_blocks(m, form), embeddings, head)
        with torch.no_grad():
            circuit.norm_bias.copy_(_bias_of(final))
        return circuit

    def _circuit_blocks(self, m, form):
        from ..circuit import _as_linear, _attention_layer, _aug_factors, _block
        blocks = []
        for l, b in enumerate(m.blocks):
            a = b.attn
            if getattr(a, "gate", None) is not None:
                raise UnsupportedModelError(f"blocks.{l}.attn has a sigmoid gate: not a plain attention head")
            if a.proj.out_features != m.embed_dim:
                raise UnsupportedModelError(f"blocks.{l}.attn.proj changes the width")
            factors = _aug_factors(a.qkv.weight.T, a.qkv.bias, a.proj.weight.T)
            attn = _attention_layer(factors, a.proj.bias, a.num_heads, self.attention_logit_scale(m, l), False, form,
                                    m.embed_dim)
            fc1, fc2 = (_as_linear(f.weight.detach(), _detach(f.bias)) for f in (b.mlp.fc1, b.mlp.fc2))
            blocks.append(_block(attn, b.norm1, b.norm2, fc1, b.mlp.act, fc2, b.norm1.eps))
        return blocks

    def build(self, config):
        """timm VisionTransformer (pre-norm, class token, no dropout) with the preset's sizes."""
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(class_token=True, global_pool="token", **config.model)

    def describe(self, config):
        m = config.model
        return (f"ViT width {m['embed_dim']}, {m['depth']} layers, {m['num_heads']} heads, "
                f"MLP {round(m['embed_dim'] * m['mlp_ratio'])}")
