"""``python -m glmc_mini align DIR_A DIR_B --out OUT``: outputs load with the stock loaders and keep
the functions, the inputs stay untouched, bad input exits with code 2 and one line naming the cause.
Tiny models built from configs and saved to temporary directories; nothing is downloaded."""
import hashlib
import json

import numpy as np
import pytest
import torch

from glmc_mini.__main__ import main
from glmc_mini.checkpoints import load_checkpoint

TEXT = ("The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40)


def _norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):  # non-trivial gains: canonicalization has work to do
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def gpt2_dir(path, seed, vocab=256, n_embd=16):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=n_embd, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)
    _norms(GPT2LMHeadModel(cfg), seed).save_pretrained(path)
    return path


VIT_ARGS = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2, mlp_ratio=2)


def vit_dir(path, seed, weights="safetensors", architecture="vit_tiny_patch16_224"):
    import timm
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf
    torch.manual_seed(seed)
    model = _norms(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT_ARGS), seed)
    path.mkdir()
    save_config_for_hf(model, path / "config.json")  # timm's own format: architecture, model_args, pretrained_cfg
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, architecture=architecture)))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(state, path / "model.safetensors")
    else:
        torch.save(state, path / "pytorch_model.bin")
    return path


def char_tokenizer(path):
    """A character-level tokenizer (ids below 64) saved beside the model, built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set(TEXT))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]")),
                                  unk_token="[UNK]")
    tok.save_pretrained(path)
    return len(vocab)


def fingerprint(path):
    return {p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def run(capsys, *args):
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(["align", *map(str, args), "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def close(x, y, rtol=1e-4):
    return (x - y).abs().max().item() <= rtol * y.abs().max().item()


def lm_logits(path, tokens):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    (root / "text.txt").write_text(TEXT)
    return gpt2_dir(root / "a", 0), gpt2_dir(root / "b", 1), root / "text.txt"


def test_weight_matching_writes_loadable_models_with_the_same_functions(gpt2_pair, tmp_path, capsys):
    a, b, _ = gpt2_pair
    before = fingerprint(a.parent)
    code, out, err = run(capsys, a, b, "--out", tmp_path / "out", "--method", "weight", "--t", 0)
    assert code == 0, err
    assert fingerprint(a.parent) == before  # the caller's directories are untouched
    assert "distance_after" in out and "wrote model_a, model_b, merged" in out
    res = tmp_path / "out"
    assert sorted(p.name for p in res.iterdir()) == ["merged", "model_a", "model_b", "summary.json"]
    for name in ("model_a", "model_b", "merged"):
        assert (res / name / "model.safetensors").is_file() and not list((res / name).glob("*.bin"))
    x = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    assert close(lm_logits(res / "model_b", x), lm_logits(b, x))        # B moved, same function
    assert close(lm_logits(res / "model_a", x), lm_logits(a, x))        # canonical A, same function
    assert close(lm_logits(res / "merged", x), lm_logits(a, x))         # t = 0: A's function
    summary = json.loads((res / "summary.json").read_text())
    assert summary["method"] == "weight" and summary["t"] == 0 and summary["canonical"]
    assert summary["distance_after"] < summary["distance_before"]


def test_learned_matching_on_bytes_and_a_merge(gpt2_pair, tmp_path, capsys):
    a, b, text = gpt2_pair
    code, _, err = run(capsys, a, b, "--out", tmp_path / "out", "--method", "learned", "--data", text,
                       "--steps", 3, "--seq-len", 16, "--t", 0.5, "--schedule", "cosine")
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["schedule"] == "cosine" and summary["steps"] == 3
    assert summary["batches"] >= 2 and len(summary["learned_loss_first_last"]) == 2
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    assert close(lm_logits(tmp_path / "out" / "model_b", x), lm_logits(b, x))
    from transformers import AutoModelForCausalLM
    A = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model_a")
    B = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model_b")
    M = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    for (k, m), va, vb in zip(M.state_dict().items(), A.state_dict().values(), B.state_dict().values()):
        assert torch.allclose(m, 0.5 * va + 0.5 * vb, atol=1e-6), k


def test_data_is_tokenized_with_the_tokenizer_of_dir_a(tmp_path, capsys):
    (tmp_path / "text.txt").write_text(TEXT)
    a, b = gpt2_dir(tmp_path / "a", 0, vocab=48), gpt2_dir(tmp_path / "b", 1, vocab=48)
    assert char_tokenizer(a) <= 48
    # bytes would give ids up to 121: only A's tokenizer keeps them below the vocabulary of 48
    code, _, err = run(capsys, a, b, "--out", tmp_path / "out", "--method", "activation", "--data",
                       tmp_path / "text.txt", "--seq-len", 16)
    assert code == 0, err
    from transformers import AutoTokenizer
    for name in ("model_a", "model_b"):
        assert (tmp_path / "out" / name / "tokenizer.json").is_file()
        assert AutoTokenizer.from_pretrained(tmp_path / "out" / name)("fox")["input_ids"]
    code, _, err = run(capsys, b, a, "--out", tmp_path / "out2", "--method", "activation", "--data",
                       tmp_path / "text.txt")
    assert code == 2 and "vocabulary has 48 tokens" in err and "bytes" in err


def test_outputs_keep_the_stored_dtype(tmp_path, capsys):
    from safetensors import safe_open
    from transformers import GPT2LMHeadModel
    for seed in (0, 1):
        model = GPT2LMHeadModel.from_pretrained(gpt2_dir(tmp_path / f"f{seed}", seed))
        model.to(torch.bfloat16).save_pretrained(tmp_path / str(seed))
    code, _, err = run(capsys, tmp_path / "0", tmp_path / "1", "--out", tmp_path / "out", "--t", 0.5)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "merged" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_a_llama_style_decoder_through_the_same_command(gpt2_pair, tmp_path, capsys):
    # AutoModelForCausalLM, not GPT-2 code: any decoder family gm.align accepts goes through
    import glmc_mini as gm
    from transformers import LlamaConfig, LlamaForCausalLM
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
        try:
            gm.model_family(model)
        except TypeError:
            pytest.skip("this glmc_mini has no Llama-style family")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(tmp_path / str(seed))
        dirs.append(tmp_path / str(seed))
    code, _, err = run(capsys, *dirs, "--out", tmp_path / "out", "--method", "learned", "--data", gpt2_pair[2],
                       "--steps", 2, "--seq-len", 16, "--t", 0)
    assert code == 0, err
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert close(lm_logits(tmp_path / "out" / "model_b", x), lm_logits(dirs[1], x))
    assert close(lm_logits(tmp_path / "out" / "merged", x), lm_logits(dirs[0], x))


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    g = torch.Generator().manual_seed(0)
    np.savez(root / "data.npz", x=torch.randn(32, 1, 8, 8, generator=g).numpy(),
             y=torch.randint(0, 10, (32,), generator=g).numpy())
    return vit_dir(root / "a", 0), vit_dir(root / "b", 1, weights="bin"), root / "data.npz"


def vit_logits(path, x, timm_loader=False):
    import timm
    model = (timm.create_model(f"local-dir:{path}", pretrained=True) if timm_loader
             else load_checkpoint(path).model).eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_timm_checkpoints(vit_pair, tmp_path, capsys, method):
    a, b, data = vit_pair
    before = fingerprint(a.parent)
    code, _, err = run(capsys, a, b, "--out", tmp_path / "out", "--method", method, "--data", data, "--t", 0)
    assert code == 0, err
    assert fingerprint(a.parent) == before
    res = tmp_path / "out"
    assert json.loads((res / "model_b" / "config.json").read_text())["architecture"] == "vit_tiny_patch16_224"
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert close(vit_logits(res / "model_b", x, timm_loader=True), vit_logits(b, x))
    assert close(vit_logits(res / "model_a", x), vit_logits(a, x))
    assert close(vit_logits(res / "merged", x, timm_loader=True), vit_logits(a, x))


class NotATensor:
    pass


def _opt_dir(path):
    from transformers import OPTConfig, OPTForCausalLM
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                             max_position_embeddings=32, word_embed_proj_dim=16)).save_pretrained(path)
    return path


def _bad_pair(kind, root, gpt2_pair, vit_pair):
    """(DIR_A, DIR_B, extra arguments, text the one-line error must contain)."""
    a, b, text = gpt2_pair
    if kind == "families":
        return a, vit_pair[0], [], "different families"
    if kind == "shapes":
        return a, gpt2_dir(root / "wide", 1, n_embd=32), [], "n_embd"
    if kind == "no config":
        (root / "empty").mkdir()
        return a, root / "empty", [], "no config.json"
    if kind == "other config":
        (root / "odd").mkdir()
        (root / "odd" / "config.json").write_text('{"hidden": 3}')
        return root / "odd", b, [], "neither a Hugging Face config"
    if kind == "unknown timm":
        return vit_dir(root / "v", 0, architecture="no_such_net"), vit_pair[1], [], "no architecture 'no_such_net'"
    if kind == "no weights":
        (root / "w").mkdir()
        (root / "w" / "config.json").write_text((a / "config.json").read_text())
        return a, root / "w", [], "cannot load"
    if kind == "missing tensor":
        from safetensors.torch import load_file, save_file
        (root / "m").mkdir()
        (root / "m" / "config.json").write_text((b / "config.json").read_text())
        state = load_file(b / "model.safetensors")
        del state["transformer.h.0.mlp.c_fc.weight"]
        save_file(state, root / "m" / "model.safetensors", metadata={"format": "pt"})
        return a, root / "m", [], "missing keys: transformer.h.0.mlp.c_fc.weight"
    if kind == "pickle":
        v = vit_dir(root / "p", 0, weights="bin")
        torch.save({"x": NotATensor()}, v / "pytorch_model.bin")
        return vit_pair[0], v, [], "refused"
    if kind == "refused model":
        return _opt_dir(root / "opt"), _opt_dir(root / "opt2"), [], "OPTForCausalLM"
    if kind == "no data":
        return a, b, ["--method", "learned"], "--method learned needs --data"
    if kind == "missing data file":
        return a, b, ["--method", "activation", "--data", root / "nope.txt"], "no such file"
    if kind == "out inside input":
        return a, b, ["--out", a / "sub"], "inside the input directory"
    if kind == "out not empty":
        (root / "full").mkdir()
        (root / "full" / "x").write_text("x")
        return a, b, ["--out", root / "full"], "not an empty directory"
    if kind == "t out of range":
        return a, b, ["--t", 1.5], "--t must lie in [0, 1]"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["families", "shapes", "no config", "other config", "unknown timm", "no weights",
                                  "missing tensor", "pickle", "refused model", "no data", "missing data file",
                                  "out inside input", "out not empty", "t out of range"])
def test_bad_input_exits_2_with_one_line(kind, gpt2_pair, vit_pair, tmp_path, capsys):
    dir_a, dir_b, extra, cause = _bad_pair(kind, tmp_path, gpt2_pair, vit_pair)
    if "--out" not in map(str, extra):
        extra = [*extra, "--out", tmp_path / "out"]
    code, out, err = run(capsys, dir_a, dir_b, *extra)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert cause in err, err
    assert not (tmp_path / "out").exists()
