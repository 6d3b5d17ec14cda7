"""The family registry: one detector, lookup by name, refusals by name, every capability either
implemented or refused."""
import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import glmc_mini as gm
from glmc_mini.families import CAPABILITIES, FAMILIES, Family, by_name, detect
from glmc_mini.profiles import replace
from glmc_mini.spaces import UnsupportedModelError

SHRINK = {"mlp": ("mlp-digits", dict(hidden=[8])),
          "vit": ("vit-digits", dict(embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0)),
          "gpt2": ("gpt-pydoc", dict(n_embd=16, n_layer=1, n_head=2, n_inner=32))}


def config(name):
    task, sizes = SHRINK[name]
    c = gm.task_config(task, "quick")
    return replace(c, model=dict(c.model, **sizes), **({"block_size": 8} if name == "gpt2" else {}))


def model(name):
    """A tiny model of the family ``name`` (circuit: the circuit form of a tiny ViT)."""
    if name == "circuit":
        return gm.to_circuit(model("vit"))
    return gm.build_model(config(name), seed=0).eval()


def test_registry_names_are_unique_and_known():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names) and {"mlp", "vit", "gpt2", "circuit"} <= set(names)
    assert all(isinstance(f, Family) and f.kind in ("classification", "language") for f in FAMILIES)


@pytest.mark.parametrize("name", ["mlp", "vit", "gpt2", "circuit"])
def test_detect_by_name_and_build_spec_agree(name):
    m = model(name)
    family = detect(m)
    assert family is by_name(name) and family is gm.detect(m)
    assert gm.model_family(m) == name == gm.build_spec(m).family
    kind = "language" if name == "gpt2" else "classification"
    assert gm.models.model_kind(m) == kind


def test_by_name_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="unknown model family 'resnet'.*mlp.*vit.*gpt2"):
        by_name("resnet")
    with pytest.raises(ValueError, match="resnet.*in the config of"):
        gm.build_model(replace(gm.task_config("mlp-digits", "quick"), family="resnet"))


def test_an_unknown_model_is_refused_naming_its_type_and_the_families():
    for m in (nn.Conv2d(1, 1, 3), nn.LSTM(2, 2)):
        with pytest.raises(UnsupportedModelError) as info:
            detect(m)
        msg = str(info.value)
        assert type(m).__name__ in msg and all(f.name in msg for f in FAMILIES)
        with pytest.raises(UnsupportedModelError, match=type(m).__name__):
            gm.build_spec(m)
    # a container the MLP family claims but cannot handle: the reason, not a generic refusal
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        detect(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))


def _call(family, capability, m, spec, cfg):
    calls = {"spec": lambda: family.spec(m),
             "canonicalize": lambda: family.canonicalize(copy.deepcopy(m)),
             "is_canonical": lambda: family.is_canonical(m, 1e-5),
             "blocks": lambda: family.blocks(m),
             "activation_sites": lambda: family.activation_sites(m, spec),
             "attention_logit_scale": lambda: family.attention_logit_scale(m, 0),
             "to_circuit": lambda: family.to_circuit(m if m is None else gm.canonicalize(m), "circuit"),
             "build": lambda: family.build(cfg)}
    with torch.no_grad():
        return calls[capability]()


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_capability_is_implemented_or_refused_by_name(family):
    """Refusals name the family and the capability (the base class refuses before reading its arguments)."""
    refused = [c for c in CAPABILITIES if not family.supports(c)]
    # a family may word a refusal itself (overriding _refuse); it still refuses, naming the family
    pattern = "(?i)" + (family.name if type(family)._refuse is not Family._refuse else
                        f"{family.name} models do not support {{}}")
    for capability in refused:
        with pytest.raises(UnsupportedModelError, match=pattern.format(capability)):
            _call(family, capability, None, None, None)
    with pytest.raises(ValueError, match="unknown capability"):
        family.supports("fly")


@pytest.mark.parametrize("name", ["mlp", "vit", "gpt2", "circuit"])
def test_every_capability_a_family_claims_runs(name):
    family, m = by_name(name), model(name)
    spec, cfg = gm.build_spec(m), config(name) if name in SHRINK else None
    for capability in CAPABILITIES:
        if family.supports(capability):
            _call(family, capability, m, spec, cfg)


def test_capabilities_agree_with_what_the_entry_points_do():
    assert by_name("vit").supports("to_circuit") and not by_name("mlp").supports("to_circuit")
    sites, readers = detect(model("mlp")).activation_sites(model("mlp"), gm.build_spec(model("mlp")))
    assert list(sites) == ["hidden.0"] and readers == [] and sites["hidden.0"][1] == "output"
    with pytest.raises(UnsupportedModelError, match="mlp models do not support to_circuit"):
        gm.to_circuit(model("mlp"))
    with pytest.raises(ValueError, match=r"embed_wider works on transformers \(vit, gpt2.*\), not mlp"):
        gm.embed_wider(model("mlp"), model("mlp"))


def test_a_family_that_implements_nothing_refuses_everything_by_name():
    class Toy(Family):
        name = "toy"

        def claims(self, model):
            return False

    toy = Toy()
    assert not any(toy.supports(c) for c in CAPABILITIES)
    with pytest.raises(UnsupportedModelError, match="toy models do not support to_circuit"):
        toy.to_circuit(nn.Linear(1, 1))
    with pytest.raises(UnsupportedModelError, match="toy models do not support build: the toy family"):
        toy.build(None)
    toy.refusals = {"build": "no presets"}
    with pytest.raises(UnsupportedModelError, match="toy models do not support build: no presets"):
        toy.build(None)


def test_detection_imports_no_model_library():
    code = ("import sys, torch.nn as nn, glmc_mini as gm\n"
            "m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))\n"
            "assert gm.detect(m).name == 'mlp' and gm.build_spec(m).family == 'mlp'\n"
            "try:\n    gm.detect(nn.Conv2d(1, 1, 3))\nexcept TypeError:\n    pass\n"
            "assert 'timm' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_implicit_config_fields_compare_by_what_they_compute():
    """GPT-2's ``n_inner=None`` is ``4 * n_embd``: the family writes it out before two configs are compared
    (``Family.config_defaults``), so a model whose config spells the number is the same architecture."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from glmc_mini.checks import check_architecture
    kw = dict(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2)
    implicit, written, other = (GPT2LMHeadModel(GPT2Config(**kw, n_inner=n)) for n in (None, 64, 32))
    assert by_name("gpt2").config_defaults(implicit.config.to_dict())["n_inner"] == 64
    check_architecture(implicit, written)
    with pytest.raises(ValueError, match="config.n_inner: 64 vs 32"):
        check_architecture(implicit, other)
    assert by_name("vit").config_defaults({"a": None}) == {"a": None}
