"""Training checkpoints: a run interrupted after a snapshot and resumed ends with the weights of an
uninterrupted run; GLMC_SEED_OFFSET moves every endpoint seed and the checkpoint key with it."""
import json

import pytest
import torch

import glmc_mini as gm
from glmc_mini import train


def _config():
    # 2 epochs of 22 batches each: an interruption inside the second epoch tests the data position too
    return gm.profiles.replace(gm.task_config("mlp-digits", "quick"), epochs=2)


def test_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    config, data = _config(), gm.load_task("mlp-digits", "quick")
    reference = train.train_model(gm.build_model(config, 3), data, config, seed=3, device="cpu", progress=False)

    calls, real_save = [], train._save_partial

    def save_then_stop(*args):
        real_save(*args)
        calls.append(args[1])
        if len(calls) == 30:                 # stop after the snapshot of step 30 (epoch 2)
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_partial", save_then_stop)
    stem = tmp_path / "mlp"
    with pytest.raises(KeyboardInterrupt):
        train.train_model(gm.build_model(config, 3), data, config, seed=3, device="cpu", progress=False,
                          checkpoint=stem, checkpoint_seconds=0.0)
    assert json.loads((tmp_path / "mlp.partial.json").read_text())["step"] == 30
    monkeypatch.setattr(train, "_save_partial", real_save)
    resumed = train.train_model(gm.build_model(config, 99), data, config, seed=3, device="cpu", progress=False,
                                checkpoint=stem, checkpoint_seconds=1e9)
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_seed_offset_moves_the_endpoint_and_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMC_CACHE", str(tmp_path))
    config = gm.profiles.replace(gm.task_config("mlp-digits", "quick"), epochs=1)
    monkeypatch.setenv("GLMC_SEED_OFFSET", "5")
    shifted = gm.get_trained(config, seed=0, device="cpu", progress=False)
    monkeypatch.delenv("GLMC_SEED_OFFSET")
    direct = gm.get_trained(config, seed=5, device="cpu", progress=False)   # loads what the offset trained
    assert all(torch.equal(p, q) for p, q in zip(shifted.parameters(), direct.parameters()))
    (meta,) = tmp_path.glob("*.json")
    record = json.loads(meta.read_text())
    assert record["seed"] == 5 and record["torch_threads"] == torch.get_num_threads()
    assert not list(tmp_path.glob("*.partial.*"))
    monkeypatch.setenv("GLMC_SEED_OFFSET", "two")
    with pytest.raises(ValueError, match="GLMC_SEED_OFFSET"):
        gm.get_trained(config, seed=0, device="cpu", progress=False)
