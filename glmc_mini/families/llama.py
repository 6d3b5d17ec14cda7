"""The Llama-style decoder family: Hugging Face's ``LlamaForCausalLM``, ``MistralForCausalLM`` and
``Qwen2ForCausalLM`` (the classes themselves): RMSNorm, SwiGLU feed-forward blocks, rotary position
embeddings, grouped-query attention (H query heads sharing G key-value heads, r = H / G each).

What survives of the four classes (chapter 6 derives each):

    residual      (d)      any orthogonal map: RMSNorm(x) = g ⊙ x / rms(x), and once every gain g is
                           folded into the layers reading the norm, x / rms(x) commutes with all of
                           O(d) (rms(O x) = rms(x)); no centring, no fixed direction
    ffn.l         (f)      permutation of the intermediate units (gate and up rows, down columns
                           together) and a per-unit rescaling: up row times s, down column over s
                           (silu(g.x) (s u.x) / s is unchanged for any s != 0; the gate row admits
                           none, silu is not homogeneous): a semi-permutation whose "copy" role
                           (the gate) is never rescaled
    heads.l       (G)      permutation of key-value groups, each carrying its r query heads
    qheads.l      (H)      permutation of the query heads within each group (only when r > 1)
    qk.l          (G x hd) per key-value head, maps that commute with the rotary rotation: one scaled
                           2 x 2 rotation per frequency pair (``symmetries.Rotary``), the query
                           heads of the group get A, the key A^-T
    ov.l          (G x hd) per key-value head, any invertible B: the value gets B, the output
                           projection's slice of each of the group's query heads B^-1

Canonical form: untie ``lm_head`` from ``embed_tokens`` (config ``tie_word_embeddings`` off, so
``from_pretrained`` does not tie them again) and fold every RMSNorm gain into its readers.
Refused by name: other classes (mixture-of-experts blocks, Gemma's offset gains and embedding
scaling live in other classes), rotary scalings whose per-pair frequency is not fixed ("dynamic",
"longrope"), partial rotary dimensions, non-element-wise activations. The circuit form is refused
(a rotary QK circuit depends on the relative position). Introduced in chapter 6.
"""
import torch
import torch.nn as nn

from ..spaces import (Segment, Space, Spec, UnsupportedModelError, _activation_name, _check_module_types, _linear,
                      _whole)
from . import Family, _isinstance

CLASSES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_MODULES = {"LlamaForCausalLM": "transformers.models.llama.modeling_llama",
            "MistralForCausalLM": "transformers.models.mistral.modeling_mistral",
            "Qwen2ForCausalLM": "transformers.models.qwen2.modeling_qwen2"}
FIXED_FREQUENCY_ROPE = ("default", "linear", "llama3", "yarn")  # per-pair frequencies that do not change with length


# decoders of the same lineage that are not covered, and why (refused by name instead of "unknown model")
NOT_COVERED = {
    "MixtralForCausalLM": "mixture-of-experts blocks (a router picks experts per token)",
    "Qwen2MoeForCausalLM": "mixture-of-experts blocks (a router picks experts per token)",
    "Qwen3MoeForCausalLM": "mixture-of-experts blocks (a router picks experts per token)",
    "GemmaForCausalLM": "RMSNorms with an offset gain (1 + w) and embeddings scaled by sqrt(d)",
    "Gemma2ForCausalLM": "RMSNorms with an offset gain (1 + w), embeddings scaled by sqrt(d) and logit soft-capping",
    "Qwen3ForCausalLM": "RMSNorms on each query and key head (they break the per-head invertible maps)",
}


def _stock_class(model):
    return next((name for name in CLASSES if _isinstance(model, _MODULES[name], name)), None)


def _module_types(model):
    import importlib
    name = type(model).__name__
    mod = importlib.import_module(_MODULES[name])
    prefix = name[:-len("ForCausalLM")]
    own = tuple(getattr(mod, f"{prefix}{part}") for part in ("Model", "DecoderLayer", "Attention", "MLP", "RMSNorm",
                                                            "RotaryEmbedding"))
    acts = tuple({type(layer.mlp.act_fn) for layer in model.model.layers})  # checked by _swiglu
    return own + acts + (nn.Embedding, nn.Linear, nn.ModuleList, nn.Dropout)


def _check_config(model):
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in FIXED_FREQUENCY_ROPE:
        raise UnsupportedModelError(f"rope type {rope_type!r}: its rotation frequencies change with the sequence "
                                    "length, so glmc_mini does not take it (it takes rotations of a fixed per-pair "
                                    f"frequency: {', '.join(FIXED_FREQUENCY_ROPE)})")
    hd = model.model.layers[0].self_attn.head_dim if len(model.model.layers) else None
    inv_freq = getattr(model.model.rotary_emb, "inv_freq", None)
    if hd is not None and (inv_freq is None or 2 * inv_freq.numel() != hd):
        raise UnsupportedModelError("partial rotary dimensions (the rotary embedding does not cover the whole head): "
                                    "not supported")
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        raise UnsupportedModelError(f"pretraining_tp={cfg.pretraining_tp}: only the plain (tp = 1) forward")


def _gain(spec, name, module, d):
    """An RMSNorm of the residual stream: its gain moves with the stream (role "gain")."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter) or w.shape != (d,) or len(list(module.parameters())) != 1:
        raise UnsupportedModelError(f"{name}: expected an RMSNorm with one gain of width {d}")
    spec.set_axis(f"{name}.weight", 0, 1, _whole(d, ("residual", "gain")))


def _attention(spec, p, attn, l, d, R_out, R_in):
    """heads.l (G groups), qheads.l (H query heads, within their group; r > 1), qk.l (rotary), ov.l."""
    H, G, hd = attn.config.num_attention_heads, attn.config.num_key_value_heads, attn.head_dim
    shapes = {"q_proj": (H * hd, d), "k_proj": (G * hd, d), "v_proj": (G * hd, d), "o_proj": (d, H * hd)}
    for name, shape in shapes.items():
        if getattr(attn, name).weight.shape != shape:
            raise UnsupportedModelError(f"{p}.self_attn.{name} is {tuple(getattr(attn, name).weight.shape)}, not the "
                                        f"configured {shape} ({H} query heads, {G} key-value heads of size {hd})")
    if H % G:
        raise UnsupportedModelError(f"{p}: {H} query heads do not split into {G} key-value groups")
    r = H // G
    heads = spec.add_space(Space(f"heads.{l}", "heads", G, ("perm",), unit=hd, layer=l))
    qheads = spec.add_space(Space(f"qheads.{l}", "qheads", H, ("perm",), unit=hd, blocks=G, layer=l)) if r > 1 else None
    qk = spec.add_space(Space(f"qk.{l}", "qk", G * hd, ("inv",), blocks=G, layer=l, rotary=True))
    ov = spec.add_space(Space(f"ov.{l}", "ov", G * hd, ("inv",), blocks=G, layer=l))
    within = ((qheads, "out"),) if qheads else ()
    wide = dict(units=((heads, r * hd),) if r > 1 else ())  # a group spans r query heads
    q = (Segment(0, H * hd, ((qk, "out"),) + within + ((heads, "out"),), repeats=((qk, r),), **wide),)
    o = (Segment(0, H * hd, ((ov, "in"),) + tuple((s, "in") for s, _ in within) + ((heads, "in"),),
                 repeats=((ov, r),), **wide),)
    _linear(spec, f"{p}.self_attn.q_proj", attn.q_proj, q, R_in)
    _linear(spec, f"{p}.self_attn.k_proj", attn.k_proj, (Segment(0, G * hd, ((qk, "in"), (heads, "out"))),), R_in)
    _linear(spec, f"{p}.self_attn.v_proj", attn.v_proj, (Segment(0, G * hd, ((ov, "out"), (heads, "out"))),), R_in)
    _linear(spec, f"{p}.self_attn.o_proj", attn.o_proj, R_out, o)


def _swiglu(spec, p, mlp, l, R_out, R_in):
    """down(silu(gate x) * up x): gate rows copied (never rescaled), up rows scaled, down columns divided."""
    _activation_name(mlp.act_fn, f"{p}.mlp.act_fn")
    f = mlp.gate_proj.out_features
    ffn = spec.add_space(Space(f"ffn.{l}", "ffn", f, ("perm", "semi"), layer=l))
    _linear(spec, f"{p}.mlp.gate_proj", mlp.gate_proj, _whole(f, (ffn, "copy")), R_in)
    _linear(spec, f"{p}.mlp.up_proj", mlp.up_proj, _whole(f, (ffn, "out")), R_in)
    _linear(spec, f"{p}.mlp.down_proj", mlp.down_proj, R_out, _whole(f, (ffn, "in")))


def llama_spec(model):
    """The space table of a Llama-style decoder (module docstring)."""
    _check_config(model)
    d = model.config.hidden_size
    spec = Spec("llama", act="gelu", tied=(("lm_head.weight", "model.embed_tokens.weight"),),
                invariant=("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"))
    spec.add_space(Space("residual", "residual", d, ("perm", "orth")))
    R_out, R_in = _whole(d, ("residual", "out")), _whole(d, ("residual", "in"))
    spec.set_axis("model.embed_tokens.weight", 1, 2, R_out)
    for l, layer in enumerate(model.model.layers):
        p = f"model.layers.{l}"
        _gain(spec, f"{p}.input_layernorm", layer.input_layernorm, d)
        _gain(spec, f"{p}.post_attention_layernorm", layer.post_attention_layernorm, d)
        _attention(spec, p, layer.self_attn, l, d, R_out, R_in)
        _swiglu(spec, p, layer.mlp, l, R_out, R_in)
    _gain(spec, "model.norm", model.model.norm, d)
    spec.set_axis("lm_head.weight", 1, 2, R_in)
    if getattr(model.lm_head, "bias", None) is not None:
        spec.invariant += ("lm_head.bias",)
    return spec


class Llama(Family):
    """HF ``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM``; presets: Llama, byte-level."""
    name, kind = "llama", "language"
    what = "transformers LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
    refusals = {"to_circuit": "with rotary embeddings the QK circuit depends on the relative position "
                              "(x_i^T W_Q^T R_(j-i) W_K x_j), so it is no single matrix per head; use form='stock'"}

    def claims(self, model):
        name = type(model).__name__
        if name in NOT_COVERED and type(model).__module__.startswith("transformers."):
            raise UnsupportedModelError(f"{name} is not supported: {NOT_COVERED[name]}. glmc_mini's decoder family "
                                        f"covers {self.what}")
        return _stock_class(model) is not None

    def spec(self, model):
        name = _stock_class(model)
        if type(model).__name__ != name or type(model).__module__ != _MODULES[name]:
            raise UnsupportedModelError(f"{type(model).__name__} is a subclass of {name}: glmc_mini supports {name} "
                                        "itself (a subclass may compute something its space table does not describe)")
        spec = llama_spec(model)
        _check_module_types(model, _module_types(model))
        return spec

    def blocks(self, model):
        return list(model.model.layers)

    def norm_readers(self, model):
        """[(RMSNorm name, [reader Linear names])]."""
        pairs = []
        for l in range(len(model.model.layers)):
            p = f"model.layers.{l}"
            pairs.append((f"{p}.input_layernorm", [f"{p}.self_attn.{x}_proj" for x in "qkv"]))
            pairs.append((f"{p}.post_attention_layernorm", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]))
        return pairs + [("model.norm", ["lm_head"])]

    def untie(self, model):
        """lm_head gets its own copy of embed_tokens, and ``tie_word_embeddings`` is switched off in the
        config so that ``save_pretrained`` / ``from_pretrained`` keep them apart."""
        emb = model.model.embed_tokens.weight
        if model.lm_head.weight is emb:
            model.lm_head.weight = nn.Parameter(emb.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        return model

    def canonicalize(self, model):
        """Untie, then fold each RMSNorm gain g into its readers (W -> W diag(g)) and set g -> 1.
        RMSNorm has no bias and no centring, so that is all: afterwards every orthogonal map of the
        residual stream commutes with every norm. A zero gain folds too (its readers' column is 0)."""
        self.untie(model)
        for norm_name, readers in self.norm_readers(model):
            g = model.get_submodule(norm_name).weight
            for r in readers:
                W = model.get_submodule(r).weight
                W.mul_(g.detach().to(W.dtype)[None, :])
            g.fill_(1.0)

    def is_canonical(self, model, atol=1e-5):
        """Untied and every RMSNorm gain 1."""
        if model.lm_head.weight is model.model.embed_tokens.weight:
            return False
        return all(bool((model.get_submodule(n).weight - 1).abs().max() <= atol) for n, _ in self.norm_readers(model))

    def activation_sites(self, model, spec):
        """ffn.l: the input of block l's down projection (silu(gate x) * up x); the residual stream:
        the input of every RMSNorm."""
        sites = {f"ffn.{l}": (layer.mlp.down_proj, "input") for l, layer in enumerate(model.model.layers)}
        norms = [model.get_submodule(n) for n, _ in self.norm_readers(model)]
        return sites, norms

    def attention_logit_scale(self, model, layer):
        return float(model.model.layers[layer].self_attn.scaling)

    def build(self, config):
        """LlamaForCausalLM of a task preset: byte-level (no special tokens), context ``config.block_size``,
        untied embeddings, no dropout; ``config.model`` holds the LlamaConfig sizes."""
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(max_position_embeddings=config.block_size, attention_dropout=0.0, tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None, **config.model)
        return LlamaForCausalLM(cfg)

    def describe(self, config):
        m = config.model
        return (f"Llama width {m['hidden_size']}, {m['num_hidden_layers']} layers, {m['num_attention_heads']} / "
                f"{m['num_key_value_heads']} q / kv heads, SwiGLU {m['intermediate_size']}, block {config.block_size}")
