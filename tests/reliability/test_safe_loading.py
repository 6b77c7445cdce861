"""Safe loading: checkpoints (trainer.resume) and local weights (model.weights) are read with
`torch.load(weights_only=True)`: a pickle that would build an arbitrary object is refused with a
ConfigError, and nothing in it runs. Checkpoints are written atomically."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from qat_runner import checkpoint as ckpt
from qat_runner.config import ConfigError
from qat_runner.models import torchvision_classifier


class Payload:
    """Unpickling this runs os.makedirs(marker): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


class Custom:
    """A plain instance of a class outside torch: not an allowed global for weights_only."""

    def __init__(self) -> None:
        self.value = 42


def _valid_state() -> dict:
    return {"step": 1, "float_model": {}, "qat_model": {}, "optimizer": {}, "rng": ckpt.rng_state(),
            "mlflow_run_id": "0" * 32}


def test_resume_refuses_code_in_pickle_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    torch.save({**_valid_state(), "extra": Payload(marker)}, path)
    with pytest.raises(ConfigError, match=r"trainer\.resume=.*evil\.pt.*not a readable checkpoint"):
        ckpt.load_checkpoint(str(path))
    assert not marker.exists(), "the pickle's payload ran: the checkpoint was not loaded weights_only"


def test_resume_refuses_custom_object(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({**_valid_state(), "extra": Custom()}, path)
    with pytest.raises(ConfigError, match=r"trainer\.resume="):
        ckpt.load_checkpoint(str(path))


def test_resume_from_run_directory(tmp_path):
    ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / ckpt.CHECKPOINT_FILE, _valid_state())
    state = ckpt.load_checkpoint(str(tmp_path / "run"))
    assert state["step"] == 1 and state["mlflow_run_id"] == "0" * 32


def test_load_checkpoint_uses_weights_only(tmp_path, monkeypatch):
    path = ckpt.save_checkpoint(tmp_path / "last.pt", _valid_state())
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ckpt.load_checkpoint(str(path))
    assert seen == [True], seen


def test_model_weights_refuse_code_in_pickle_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(10, 512), "extra": Payload(marker)}, path)
    with pytest.raises(ConfigError, match=r"model\.weights=.*weights\.pth"):
        torchvision_classifier("resnet18", num_classes=10, weights=str(path))
    assert not marker.exists(), "the pickle's payload ran: model.weights was not loaded weights_only"


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint intact and no temporary file."""
    path = ckpt.save_checkpoint(tmp_path / "checkpoints" / "last.pt", _valid_state())
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(path, {**_valid_state(), "step": 2})
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert ckpt.load_checkpoint(str(path))["step"] == 1


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_get_the_users_file_mode(tmp_path, umask):
    """Files written atomically (checkpoints, summaries, the sweep record, the benchmark's JSON)
    get 0666 less the umask, as `open(path, "w")` would give them, not mkstemp's 0600."""
    from qat_runner import sweep
    from qat_runner.engine.files import write_atomically, write_text_atomically

    old = os.umask(umask)
    try:
        paths = [write_text_atomically(tmp_path / "summary.json", "{}"),
                 write_atomically(tmp_path / "a.bin", lambda tmp: Path(tmp).write_bytes(b"x")),
                 ckpt.save_checkpoint(tmp_path / "checkpoints" / "last.pt", _valid_state()),
                 sweep.write_sweep_parent(tmp_path / "sweep", {"run_id": "r"}),
                 sweep.write_csv([], tmp_path / "sweep" / sweep.CSV_FILE)]
        expected = tmp_path / "plain.txt"
        expected.write_text("")
    finally:
        os.umask(old)
    assert expected.stat().st_mode & 0o777 == 0o666 & ~umask
    for path in paths:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
