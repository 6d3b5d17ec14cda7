"""The Llama-style decoder family (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM): every
symmetry class keeps the function exactly and the stock class, planted transforms are recovered by
weight matching, aligned models survive save_pretrained / from_pretrained, and what is not covered
is refused by name. Models are built from configs (never a hub download)."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import glmc_mini as gm
from glmc_mini.symmetries import (Invertible, Permutation, Rotary, apply_transforms, random_transforms,
                                  transform_state)

CLASSES = {"llama": (LlamaForCausalLM, LlamaConfig), "mistral": (MistralForCausalLM, MistralConfig),
           "qwen2": (Qwen2ForCausalLM, Qwen2Config)}
ALL = ("perm", "semi", "orth", "inv")
VOCAB = 40


def decoder(kind="llama", d=None, H=4, G=2, hd=8, f=24, layers=2, tied=False, bias=False, theta=10000.0, seed=0):
    """A small decoder with random gains and biases (so that folding and centring are exercised)."""
    cls, config_cls = CLASSES[kind]
    extra = dict(attention_bias=bias, mlp_bias=bias) if kind == "llama" else {}
    config = config_cls(vocab_size=VOCAB, hidden_size=d or H * hd, intermediate_size=f, num_hidden_layers=layers,
                        num_attention_heads=H, num_key_value_heads=G, head_dim=hd, max_position_embeddings=32,
                        tie_word_embeddings=tied, rope_parameters=dict(rope_type="default", rope_theta=theta),
                        **extra)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.2)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


configs = st.fixed_dictionaries(dict(
    kind=st.sampled_from(sorted(CLASSES)),
    G=st.sampled_from([1, 2, 4]),         # MQA, GQA, MHA (H = 4)
    r=st.sampled_from([1, 2]),            # query heads per key-value head
    hd=st.sampled_from([4, 6, 8, 12, 16]),
    m=st.sampled_from([2, 3, 4, 6]),      # width = m * query heads (transformers requires a multiple)
    f=st.sampled_from([8, 20]),
    layers=st.sampled_from([1, 2]),
    tied=st.booleans(),
    bias=st.booleans(),
    theta=st.sampled_from([100.0, 10000.0, 500000.0]),
    seed=st.integers(0, 10_000),
))


def _build(c):
    H = c["G"] * c["r"]
    return decoder(c["kind"], d=c["m"] * H, H=H, G=c["G"], hd=c["hd"], f=c["f"], layers=c["layers"], tied=c["tied"],
                   bias=c["bias"], theta=c["theta"], seed=c["seed"])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_every_class_keeps_the_function_and_the_stock_class(c):
    model = _build(c)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(c["seed"]))
    ref = logits(model, x)
    canon = gm.canonicalize(model)
    assert gm.is_canonical(canon) and rel(logits(canon, x), ref) <= 1e-4
    T = random_transforms(gm.build_spec(canon), ALL, seed=c["seed"])
    moved = apply_transforms(canon, T)
    assert type(moved) is type(model)
    assert rel(logits(moved, x), ref) <= 1e-4
    assert isinstance(T["qk.0"], Rotary) and isinstance(T["ov.0"], Invertible)
    if c["r"] > 1:
        assert "qheads.0" in T


@pytest.mark.parametrize("kind,G,bias,tied", [("llama", 4, False, False), ("llama", 2, True, True),
                                              ("qwen2", 1, True, False), ("mistral", 2, False, True)])
@pytest.mark.parametrize("symmetries", [("perm",), ("perm", "orth", "inv"), ALL])
def test_weight_matching_recovers_planted_transforms(kind, G, bias, tied, symmetries):
    canon = gm.canonicalize(decoder(kind, G=G, bias=bias, tied=tied, seed=3))
    T = random_transforms(gm.build_spec(canon), symmetries, seed=5)
    moved = apply_transforms(canon, T)
    found, history = gm.weight_matching(canon, moved, symmetries=symmetries)
    assert history[-1] <= 1e-9 * history[0], (history[0], history[-1])
    spec = gm.build_spec(canon)
    B = transform_state(dict(moved.state_dict()), spec, found)
    A = canon.state_dict()
    assert max(float((A[k] - B[k]).abs().max()) for k in A) <= 1e-4


@settings(max_examples=12, deadline=None)
@given(configs)
def test_weight_matching_recovers_planted_transforms_on_generated_configs(c):
    # heads no wider than half the stream (every real decoder): a head wider than the stream has
    # directions no weight sees, so its per-head maps are not determined by the weights
    assume(c["m"] * c["G"] * c["r"] >= 2 * c["hd"])
    canon = gm.canonicalize(_build(c))
    T = random_transforms(gm.build_spec(canon), ("perm", "orth", "inv"), seed=c["seed"] + 1)
    _, history = gm.weight_matching(canon, apply_transforms(canon, T))
    assert history[-1] <= 1e-9 * history[0], (history[0], history[-1])


def test_rotary_maps_commute_with_rope_and_general_maps_do_not():
    canon = gm.canonicalize(decoder(G=2, seed=1))
    spec = gm.build_spec(canon)
    x = torch.randint(0, VOCAB, (2, 12))
    ref = logits(canon, x)
    g = torch.Generator().manual_seed(0)
    general = Invertible.random(2, 8, generator=g)
    with pytest.raises(gm.UnsupportedModelError, match="rotary"):
        apply_transforms(canon, {"qk.0": general})
    # such maps forced through (no check) change the function, by far more than rounding (an
    # exact transform moves the logits by ~1e-7 relative): the restriction is needed
    forced_maps = {f"qk.{l}": Invertible.random(2, 8, generator=g) for l in range(2)}
    state = transform_state(dict(canon.state_dict()), spec, forced_maps, check=False)
    forced = type(canon)(canon.config).eval()
    forced.load_state_dict(state)
    assert rel(logits(forced, x), ref) > 1e-3
    rotary = {f"qk.{l}": Rotary.random(2, 8, generator=g) for l in range(2)}
    assert rel(logits(apply_transforms(canon, rotary), x), ref) <= 1e-5
    # a general invertible map of the value/output side is exact
    assert rel(logits(apply_transforms(canon, {"ov.0": general}), x), ref) <= 1e-4


def test_query_heads_stay_in_their_group():
    canon = gm.canonicalize(decoder(H=4, G=2))
    with pytest.raises(gm.UnsupportedModelError, match="moves entries between heads|block"):
        apply_transforms(canon, {"qheads.0": Permutation(torch.tensor([2, 1, 0, 3]))})
    ok = apply_transforms(canon, {"qheads.0": Permutation(torch.tensor([1, 0, 3, 2]))})
    x = torch.randint(0, VOCAB, (1, 9))
    assert rel(logits(ok, x), logits(canon, x)) <= 1e-5


def test_swiglu_rescaling_is_exact_for_any_nonzero_scale_on_up_and_never_on_gate():
    model = decoder(G=4, f=16)
    x = torch.randint(0, VOCAB, (2, 8))
    ref = logits(model, x)
    s = torch.linspace(-3.0, 3.0, 16)
    s[s.abs() < 0.1] = 0.5  # any s != 0, negative included
    moved = type(model)(model.config).eval()
    state = dict(model.state_dict())
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] * s[:, None]
    state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"] / s[None, :]
    moved.load_state_dict(state)
    assert rel(logits(moved, x), ref) <= 1e-4
    state["model.layers.0.mlp.up_proj.weight"] = model.state_dict()["model.layers.0.mlp.up_proj.weight"]
    state["model.layers.0.mlp.gate_proj.weight"] = state["model.layers.0.mlp.gate_proj.weight"] * s[:, None].abs()
    moved.load_state_dict(state)
    assert rel(logits(moved, x), ref) > 1e-3  # silu is not homogeneous: the gate admits no scale


def test_rmsnorm_without_gain_commutes_with_any_orthogonal_map():
    canon = gm.canonicalize(decoder(G=2, seed=2))
    spec = gm.build_spec(canon)
    assert not spec.spaces["residual"].fix_ones
    T = random_transforms(spec, ("orth",), seed=0)
    O = T["residual"].O
    assert not T["residual"].fixes_ones()  # a general orthogonal map, not one fixing the all-ones direction
    assert torch.allclose(O.T @ O, torch.eye(O.shape[0]), atol=1e-5)
    x = torch.randint(0, VOCAB, (2, 10))
    assert rel(logits(apply_transforms(canon, T), x), logits(canon, x)) <= 1e-4
    with pytest.raises(gm.UnsupportedModelError, match="canonical"):
        apply_transforms(decoder(G=2, seed=2), T)  # gains not folded yet


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip_keeps_the_aligned_function(tmp_path, tied):
    a, b = decoder(G=2, tied=tied, seed=0), decoder(G=2, tied=tied, seed=1)
    res = gm.align(a, b, method="weight")
    x = torch.randint(0, VOCAB, (2, 10))
    merged = gm.interpolate(res.model_a, res.model_b, 0.5)
    for model in (res.model_b, merged):
        model.save_pretrained(tmp_path / "m", safe_serialization=True)
        loaded = type(model).from_pretrained(tmp_path / "m").eval()
        assert not loaded.config.tie_word_embeddings
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
        assert rel(logits(loaded, x), logits(model, x)) <= 1e-6
    assert rel(logits(res.model_b, x), logits(b, x)) <= 1e-4
    assert a.config.tie_word_embeddings == tied  # the caller's model is untouched


def test_activation_and_learned_matching_keep_b_and_its_class():
    a, b = decoder(G=2, seed=0), decoder(G=2, seed=1)
    data = [torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    x = data[0]
    for method, steps in (("activation", None), ("learned", 6)):
        res = gm.align(a, b, method=method, data=data, steps=steps)
        assert type(res.model_b) is LlamaForCausalLM
        assert rel(logits(res.model_b, x), logits(b, x)) <= 1e-3
        if method == "learned":
            assert isinstance(res.transforms["qk.0"], Rotary)


@pytest.mark.parametrize("rope,match", [(dict(rope_type="dynamic", factor=2.0), "dynamic"),
                                        (dict(rope_type="longrope", short_factor=[1.0] * 4, long_factor=[1.0] * 4,
                                              original_max_position_embeddings=16), "longrope"),
                                        (dict(rope_type="linear", factor=2.0, partial_rotary_factor=0.5),
                                         "partial rotary")])
def test_rope_variants_outside_the_family_are_refused_by_name(rope, match):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         rope_parameters=dict(rope, rope_theta=10000.0))
    with pytest.raises(gm.UnsupportedModelError, match=match):
        gm.build_spec(LlamaForCausalLM(config))


def test_what_is_not_covered_is_refused_by_name():
    from transformers import MixtralConfig, MixtralForCausalLM
    small = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=32)
    with pytest.raises(gm.UnsupportedModelError, match="mixture-of-experts"):
        gm.build_spec(MixtralForCausalLM(MixtralConfig(num_local_experts=2, **small)))

    class Sub(LlamaForCausalLM):
        pass
    with pytest.raises(gm.UnsupportedModelError, match="subclass"):
        gm.build_spec(Sub(LlamaConfig(**small)))
    with pytest.raises(gm.UnsupportedModelError, match="relative position"):
        gm.to_circuit(decoder())
    with pytest.raises(gm.UnsupportedModelError, match="relative position"):
        gm.align(decoder(seed=0), decoder(seed=1), method="weight", form="circuit")
    with pytest.raises(ValueError, match="rotary"):
        gm.embed_wider(decoder(hd=4), decoder(hd=8))


def test_llama_preset_builds_the_stock_class():
    config = gm.task_config("llama-pydoc", "quick")
    model = gm.build_model(config, seed=0)
    assert type(model) is LlamaForCausalLM and gm.model_family(model) == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention
    assert not model.config.tie_word_embeddings


def test_compose_and_invert_carry_query_heads_and_rotary_maps_across_group_orders():
    canon = gm.canonicalize(decoder(H=4, G=2, seed=4))
    spec = gm.build_spec(canon)
    x = torch.randint(0, VOCAB, (2, 10))
    first, second = random_transforms(spec, ALL, seed=1), random_transforms(spec, ALL, seed=2)
    both = gm.compose_transforms(second, first)
    assert isinstance(both["qk.0"], Rotary)
    step = apply_transforms(apply_transforms(canon, first), second).state_dict()
    once = apply_transforms(canon, both)
    # the same parameters (not only the same function, which any transform keeps)
    assert max(float((once.state_dict()[k] - step[k]).abs().max() / step[k].abs().max().clamp_min(1e-12))
               for k in step) <= 1e-4
    assert rel(logits(once, x), logits(canon, x)) <= 1e-4
    B = transform_state(dict(once.state_dict()), spec, gm.invert_transforms(both))
    A = canon.state_dict()
    assert max(float((A[k] - B[k]).abs().max() / A[k].abs().max().clamp_min(1e-12)) for k in A) <= 1e-4


def test_align_many_keeps_every_decoders_function():
    models = [decoder(H=4, G=2, seed=s) for s in range(3)]
    x = torch.randint(0, VOCAB, (2, 10))
    res = gm.align_many(models, method="weight", progress=False)
    for before, after in zip(models, res.models):
        assert type(after) is LlamaForCausalLM
        assert rel(logits(after, x), logits(before, x)) <= 1e-4
