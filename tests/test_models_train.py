"""Models, seeded training and the checkpoint cache, on tiny configs (not the presets)."""
import json

import pytest
import torch
from torch import nn

import glmc_mini as gm
from glmc_mini import train as gt
from glmc_mini.profiles import replace


def tiny(task):
    """A preset shrunk to a few training steps (keeps the tests fast)."""
    c = gm.task_config(task, "quick")
    shrink = {"mlp": dict(model=dict(c.model, hidden=[16, 16]), epochs=0, steps=6),
              "vit": dict(model=dict(c.model, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2.0), epochs=0, steps=4),
              "gpt2": dict(model=dict(c.model, n_embd=16, n_layer=1, n_head=2, n_inner=32), block_size=16, steps=4)}
    return replace(c, batch_size=8, **shrink[c.family])


def same_weights(model_a, model_b):
    a, b = model_a.state_dict(), model_b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("task, family, shape", [("mlp-digits", "mlp", (2, 10)), ("mlp-relu-digits", "mlp", (2, 10)),
                                                 ("vit-digits", "vit", (2, 10)), ("gpt-pydoc", "gpt2", (2, 16, 256))])
def test_build_model_family_and_logits(task, family, shape):
    config = tiny(task)
    model = gm.build_model(config, seed=0)
    assert gm.model_family(model) == family
    x = next(iter(gm.load_task(config).loader("test", 2)))
    x = x[0] if isinstance(x, list) else x
    assert gm.forward_logits(model, x).shape == shape
    assert same_weights(model, gm.build_model(config, seed=0))
    assert not same_weights(model, gm.build_model(config, seed=1))


def test_stock_classes_and_no_dropout():
    from timm.models.vision_transformer import VisionTransformer
    from transformers import GPT2LMHeadModel
    relu = gm.build_model("mlp-relu-digits")
    assert isinstance(relu, nn.Sequential) and isinstance(relu[2], nn.ReLU) and isinstance(gm.build_model("mlp-digits")[2], nn.GELU)
    vit = gm.build_model("vit-digits")
    assert isinstance(vit, VisionTransformer) and vit.cls_token is not None and vit.patch_embed.patch_size == (2, 2)
    gpt = gm.build_model("gpt-pydoc")
    assert isinstance(gpt, GPT2LMHeadModel) and gpt.config.vocab_size == 256
    assert gpt.config.resid_pdrop == gpt.config.embd_pdrop == gpt.config.attn_pdrop == 0


def test_model_family_errors_and_generic_models():
    with pytest.raises(TypeError, match="Conv2d"):
        gm.model_family(nn.Conv2d(1, 1, 3))

    class Circuit(nn.Linear):
        glmc_family, glmc_kind = "circuit", "language"

    class Generic(nn.Linear):
        glmc_kind = "classification"

    assert gm.model_family(Circuit(2, 2)) == "circuit" and gm.model_family(Generic(2, 2)) == "circuit"


def test_lr_schedule_warmup_then_cosine():
    factors = [gt.lr_factor(s, 100, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.01


@pytest.mark.parametrize("task", ["mlp-digits", "gpt-pydoc"])
def test_training_is_deterministic(task):
    config = tiny(task)
    data = gm.load_task(config)
    runs = [gm.train_model(gm.build_model(config, s), data, config, seed=s, progress=False) for s in (0, 0, 1)]
    assert same_weights(runs[0], runs[1]) and not same_weights(runs[0], runs[2])
    assert not same_weights(runs[0], gm.build_model(config, 0))  # it did train


def test_training_lowers_the_loss():
    config = replace(tiny("mlp-digits"), steps=60, lr=1e-2, batch_size=32)
    data = gm.load_task(config)
    before = gm.evaluate(gm.build_model(config, 0), data.loader("test", 360))["loss"]
    after = gm.evaluate(gm.train_model(gm.build_model(config, 0), data, config, 0, progress=False), data.loader("test", 360))
    assert after["loss"] < before - 0.5 and after["acc"] > 0.6


def test_augment_is_seeded_and_keeps_shape():
    x = torch.randn(5, 3, 8, 8)
    out = [gt._augment(x, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert out[0].shape == x.shape and torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_checkpoint_key_changes_with_config_and_seed():
    config = tiny("mlp-digits")
    key = gm.checkpoint_key(config, 0)
    assert len(key) == 12 and int(key, 16) >= 0 and key == gm.checkpoint_key(config, 0)
    assert key != gm.checkpoint_key(config, 1) and key != gm.checkpoint_key(replace(config, lr=1e-2), 0)


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMC_CACHE", str(tmp_path))
    assert gm.cache_dir() == tmp_path


@pytest.mark.parametrize("task", ["mlp-digits", "gpt-pydoc"])
def test_cache_hit_loads_identical_weights_without_training(task, monkeypatch, tmp_path):
    monkeypatch.setenv("GLMC_CACHE", str(tmp_path))
    config = tiny(task)
    trained = gm.get_trained(config, seed=3, device="cpu", progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    key = gm.checkpoint_key(config, 3)
    assert files == [f"{task}-{key}.json", f"{task}-{key}.safetensors"]  # no temp files left
    assert json.loads((tmp_path / files[0]).read_text())["seed"] == 3

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the checkpoint was cached")
    monkeypatch.setattr(gt, "train_model", no_training)
    loaded = gm.get_trained(config, seed=3, device="cpu")
    assert same_weights(trained, loaded) and not loaded.training and not trained.training
    if task == "gpt-pydoc":  # the tied output embedding is tied again after loading
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_cache_with_mismatched_json_retrains(monkeypatch, tmp_path):
    monkeypatch.setenv("GLMC_CACHE", str(tmp_path))
    config = tiny("mlp-digits")
    first = gm.get_trained(config, seed=0, device="cpu", progress=False)
    meta = tmp_path / f"mlp-digits-{gm.checkpoint_key(config, 0)}.json"
    record = json.loads(meta.read_text())
    record["config"]["lr"] = 123.0
    meta.write_text(json.dumps(record))
    calls = []
    real = gt.train_model
    monkeypatch.setattr(gt, "train_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = gm.get_trained(config, seed=0, device="cpu", progress=False)
    assert calls == [1] and same_weights(first, again)  # retrained, deterministically the same


def test_training_split_smaller_than_a_batch_is_a_clear_error():
    config = replace(tiny("mlp-digits"), batch_size=100_000)
    with pytest.raises(ValueError, match="fewer than batch_size=100000"):
        gm.train_model(gm.build_model(config, 0), gm.load_task(config), config, 0, progress=False)
