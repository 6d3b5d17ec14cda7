"""The GPT-2 family: Hugging Face's ``GPT2LMHeadModel`` (the class itself), a pre-norm causal
language model whose Conv1D weights are stored [in, out].

Spaces: residual (perm, orth fixing the ones direction; ``wte`` writes, ``lm_head`` reads, so a
tied pair is untied first), and per block heads.l, qk.l, ov.l (fused ``c_attn``) and ffn.l
(``c_fc``, act, ``c_proj``). Canonical form: untie, then the pre-norm canonical form (``prenorm``).
Introduced in chapter 1.
"""
import torch
import torch.nn as nn

from ..spaces import (Space, Spec, UnsupportedModelError, _activation_name, _attention_spaces, _ffn_classes,
                      _linear, _norm, _stock_checks, _whole)
from . import _isinstance
from .prenorm import PreNormTransformer


def gpt2_spec(model):
    """The table of a Hugging Face ``GPT2LMHeadModel`` (pre-norm; Conv1D weights are stored [in, out])
    (:meth:`GPT2.spec` adds the checks of the stock class)."""
    cfg = model.config
    if getattr(cfg, "add_cross_attention", False):
        raise UnsupportedModelError("GPT-2 with cross-attention is not supported")
    d, H = cfg.n_embd, cfg.n_head
    acts = {_activation_name(blk.mlp.act, f"transformer.h.{l}.mlp.act") for l, blk in enumerate(model.transformer.h)}
    for l, blk in enumerate(model.transformer.h):
        attn = blk.attn
        if getattr(attn, "is_cross_attention", False) or attn.num_heads != H or getattr(attn, "pruned_heads", None) \
                or attn.c_attn.weight.shape != (d, 3 * d) or attn.c_proj.weight.shape != (d, d):
            raise UnsupportedModelError(f"transformer.h.{l}.attn is not the configured self-attention of {H} heads "
                                        "of size n_embd / n_head (pruned heads or cross-attention)")
    invariant = tuple(f"transformer.h.{l}.attn.{b}" for l in range(len(model.transformer.h))
                      for b in ("bias", "masked_bias"))  # causal-mask buffers of older transformers
    spec = Spec("gpt2", act="relu" if acts == {"relu"} else "gelu", invariant=invariant,
                tied=(("lm_head.weight", "transformer.wte.weight"),))  # canonicalize unties them
    spec.add_space(Space("residual", "residual", d, ("perm", "orth"), fix_ones=True))
    R_out, R_in = _whole(d, ("residual", "out")), _whole(d, ("residual", "in"))
    spec.set_axis("transformer.wte.weight", 1, 2, R_out)
    spec.set_axis("transformer.wpe.weight", 1, 2, R_out)
    for l, blk in enumerate(model.transformer.h):
        p = f"transformer.h.{l}"
        qkv, proj_in = _attention_spaces(spec, l, H, d // H)
        _norm(spec, f"{p}.ln_1", blk.ln_1, d)
        _norm(spec, f"{p}.ln_2", blk.ln_2, d)
        _linear(spec, f"{p}.attn.c_attn", blk.attn.c_attn, qkv, R_in, conv1d=True)
        _linear(spec, f"{p}.attn.c_proj", blk.attn.c_proj, R_out, proj_in, conv1d=True)
        f = blk.mlp.c_fc.nf
        ffn = spec.add_space(Space(f"ffn.{l}", "ffn", f, _ffn_classes(spec.act), layer=l))
        _linear(spec, f"{p}.mlp.c_fc", blk.mlp.c_fc, _whole(f, (ffn, "out")), R_in, conv1d=True)
        _linear(spec, f"{p}.mlp.c_proj", blk.mlp.c_proj, R_out, _whole(f, (ffn, "in")), conv1d=True)
    _norm(spec, "transformer.ln_f", model.transformer.ln_f, d)
    # tied or not, lm_head reads ln_f's output; tied weights must be untied (canonicalize) before
    # any non-permutation acts on the residual stream, since wte writes and lm_head reads.
    spec.set_axis("lm_head.weight", 1, 2, R_in)
    return spec


def _module_types():
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention, GPT2Block, GPT2Model
    from transformers.pytorch_utils import Conv1D
    return (GPT2Model, GPT2Block, GPT2Attention, GPT2MLP, Conv1D, nn.Embedding, nn.LayerNorm, nn.Dropout,
            nn.ModuleList, nn.Linear)


class GPT2(PreNormTransformer):
    """HF ``GPT2LMHeadModel``; presets: byte-level (no special tokens), every dropout 0."""
    name, kind = "gpt2", "language"
    what = "transformers GPT2LMHeadModel"

    def claims(self, model):
        return _isinstance(model, "transformers", "GPT2LMHeadModel")

    def spec(self, model):
        from transformers import GPT2LMHeadModel
        return _stock_checks(model, gpt2_spec(model), _module_types(), GPT2LMHeadModel)

    def blocks(self, model):
        return list(model.transformer.h)

    def norm_readers(self, model):
        h = model.transformer.h
        pairs = [(f"transformer.h.{l}.ln_1", [f"transformer.h.{l}.attn.c_attn"]) for l in range(len(h))]
        pairs += [(f"transformer.h.{l}.ln_2", [f"transformer.h.{l}.mlp.c_fc"]) for l in range(len(h))]
        pairs.append(("transformer.ln_f", ["lm_head"]))
        return pairs

    def config_defaults(self, config):
        """``n_inner=None`` means ``4 * n_embd`` (``apply_transforms`` writes the number when it resizes)."""
        if config.get("n_inner") is None:
            config = dict(config, n_inner=4 * config["n_embd"])
        return config

    def untie(self, model):
        """lm_head gets its own copy of wte (``tie_word_embeddings`` off): canonical writers and readers differ."""
        if model.lm_head.weight is model.transformer.wte.weight:
            model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
        model.config.tie_word_embeddings = False
        return model

    def prepare(self, model):
        self.untie(model)

    def is_canonical(self, model, atol=1e-5):
        """Untied, writers centred, norm gains 1."""
        if model.lm_head.weight is model.transformer.wte.weight:
            return False
        return super().is_canonical(model, atol)

    def attention_logit_scale(self, model, layer):
        """HF's ``scaling``, or (older transformers) from the config: 1/sqrt(hd) if scale_attn_weights,
        divided by layer + 1 if scale_attn_by_inverse_layer_idx."""
        attn, cfg = model.transformer.h[layer].attn, model.config
        if hasattr(attn, "scaling"):
            return float(attn.scaling)
        s = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
        return s / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else s

    def to_circuit(self, model, form="circuit"):
        """Canonical (untied) GPT2LMHeadModel -> CircuitTransformer (Conv1D weights transposed to [out, in])."""
        from ..circuit import (CircuitConfig, CircuitTransformer, _as_linear, _attention_layer, _aug_factors,
                               _bias_of, _block, _single_eps)
        m = model
        cfg, tr = m.config, m.transformer
        d, blocks = cfg.n_embd, []
        for l, b in enumerate(tr.h):
            a = b.attn
            factors = _aug_factors(a.c_attn.weight, a.c_attn.bias, a.c_proj.weight)
            attn = _attention_layer(factors, a.c_proj.bias, cfg.n_head, self.attention_logit_scale(m, l), True, form, d)
            fc1 = _as_linear(b.mlp.c_fc.weight.detach().T, b.mlp.c_fc.bias.detach())
            fc2 = _as_linear(b.mlp.c_proj.weight.detach().T, b.mlp.c_proj.bias.detach())
            blocks.append(_block(attn, b.ln_1, b.ln_2, fc1, b.mlp.act, fc2, b.ln_1.eps))
        eps = _single_eps([tr.ln_f] + [n for b in tr.h for n in (b.ln_1, b.ln_2)])
        embeddings = {"wte": tr.wte.weight.detach(), "wpe": tr.wpe.weight.detach()}
        bias = getattr(m.lm_head, "bias", None)
        head = _as_linear(m.lm_head.weight.detach(), None if bias is None else bias.detach())
        circuit = CircuitTransformer(CircuitConfig("gpt2", d, eps), blocks, embeddings, head)
        with torch.no_grad():
            circuit.norm_bias.copy_(_bias_of(tr.ln_f))
        return circuit

    def build(self, config):
        """GPT2LMHeadModel with context ``config.block_size`` and every dropout set to 0."""
        from transformers import GPT2Config, GPT2LMHeadModel
        gpt_config = GPT2Config(n_positions=config.block_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                bos_token_id=None, eos_token_id=None, **config.model)  # byte-level: no special tokens
        return GPT2LMHeadModel(gpt_config)

    def describe(self, config):
        m = config.model
        return (f"GPT-2 width {m['n_embd']}, {m['n_layer']} layers, {m['n_head']} heads, "
                f"MLP {m['n_inner']}, block {config.block_size}")
