"""Checkpoints load with torch's weights-only unpickler: what mmengine writes loads, anything else is refused."""

import os
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import _load_checkpoint

import tokenprune  # noqa: F401  (installs the allow-list)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/tokenprune_pwned",))


def mmengine_like_checkpoint() -> dict:
    hub = MessageHub.get_instance("test_safe_load")
    for i in range(3):
        hub.update_scalar("train/loss", np.float64(1.0 / (i + 1)))
    hub.update_info("iter", 3)
    return {
        "meta": {"iter": 3, "epoch": 0, "seed": np.int64(7), "dataset_meta": {"classes": ("a", "b")}},
        "state_dict": {"w": torch.ones(2)},
        "message_hub": hub.state_dict(),
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(2), "step": torch.tensor(3.0)}}, "param_groups": []},
    }


def test_mmengine_checkpoint_loads_weights_only(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(mmengine_like_checkpoint(), path)
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    assert "builtins.getattr" not in unsafe
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    buffer = loaded["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer) and buffer.current() == pytest.approx(1 / 3)
    assert buffer.mean() == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert _load_checkpoint(str(path), map_location="cpu")["meta"]["seed"] == 7


def test_arbitrary_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        _load_checkpoint(str(path), map_location="cpu")
    assert not os.path.exists("/tmp/tokenprune_pwned")
