"""trainer.float_cache: the float stage is kept per recipe and reused; other recipes train anew."""
from __future__ import annotations

import torch

from helpers.runner import compose_config
from qat_runner import float_cache
from qat_runner.models import LeNet


def _cfg(tmp_path, *overrides):
    return compose_config([f"paths.outputs={tmp_path}", "trainer.float_cache=true", *overrides])


def test_saved_float_stage_loads_into_a_fresh_model(tmp_path):
    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    trained = LeNet()
    assert float_cache.load(cfg, trained) is None  # nothing cached yet
    path = float_cache.save(cfg, trained)
    assert path.parent == tmp_path / "float_cache" and not list(path.parent.glob("*.tmp"))
    fresh = LeNet()
    assert float_cache.load(cfg, fresh) == path
    for name, value in trained.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name


def test_key_follows_what_the_float_stage_depends_on(tmp_path):
    base = float_cache.cache_file(_cfg(tmp_path))
    # the float stage runs at trainer.float_lr and never sees the test split or the QAT settings
    for same in (["optim.lr=0.5"], ["quant.bits=4"], ["trainer.max_steps=7"], ["dataset.num_workers=1"]):
        assert float_cache.cache_file(_cfg(tmp_path, *same)) == base, same
    for other in (["trainer.float_lr=0.01"], ["trainer.float_steps=10"], ["trainer.float_schedule=cosine"],
                  ["seed=1"], ["optim=adam"],
                  ["trainer.batch_size=16"], ["dataset.test_fraction=0.3"]):
        assert float_cache.cache_file(_cfg(tmp_path, *other)) != base, other


def test_a_file_with_another_recipe_is_not_used(tmp_path):
    cfg = _cfg(tmp_path)
    path = float_cache.save(cfg, LeNet())
    payload = torch.load(path, weights_only=True)
    payload["recipe"]["seed"] = 99
    torch.save(payload, path)
    assert float_cache.load(cfg, LeNet()) is None
