"""The command line's JSON schema, on a tiny run: quick profile, mlp-digits, seeds 0 1."""
import json

import torch

from glmc_mini.__main__ import main

FIELDS = {"barrier": float, "barrier_std": float, "barrier_stock": type(None), "barrier_acc": float,
          "loss_a": float, "loss_b": float, "seconds": float}


def test_reproduce_json_schema(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GLMC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GLMC_PROFILE", "quick")  # restored afterwards (main sets it from --profile)
    threads = torch.get_num_threads()
    out = tmp_path / "results.json"
    try:
        assert main(["reproduce", "--profile", "quick", "--tasks", "mlp-digits", "--seeds", "0", "1",
                     "--steps", "5", "--test-batches", "1", "--no-progress", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "active profile: quick" in printed and "learned, all classes" in printed
    results = json.loads(out.read_text())
    assert list(results) == ["mlp-digits"]
    methods = results["mlp-digits"]
    assert set(methods) == {"vanilla", "activation", "weight", "learned_perm", "learned"}
    for method, entry in methods.items():
        assert set(entry) == set(FIELDS), method
        for key, kind in FIELDS.items():
            assert isinstance(entry[key], kind), (method, key, entry[key])
        assert entry["loss_a"] > 0 and entry["loss_b"] > 0
