"""Checkpoints a user may hand us load with `weights_only=True`: a planted `state.pt` whose pickle would run code
fails with a one-line error naming the file (and runs nothing); a normal resume still works.

The run is a tiny in-process distillation (workers=0) on the data of test_distill.py."""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from raysad.distill import run_distill
from raysad.checkpoints import CheckpointError, latest_checkpoint, load_state
from test_distill import config, data, losses, one_thread  # noqa: F401 - the fixtures used here


class PlantedPayload:
    """Unpickling this writes `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def interrupted_run(data, out):
    """A run that died after its checkpoint at step 2 (the injected failure at step 3)."""
    cfg = config(data, out, batch_size=4, micro_batch_size=2, max_steps=4, checkpoint_every=2,
                 fail_once_at_step=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distill(cfg, track=False)
    return cfg


def plant(checkpoint, marker) -> None:
    """Overwrite the checkpoint's state.pt with a well-formed-looking one carrying the payload."""
    good = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    torch.save({**good, "model": PlantedPayload(marker)}, checkpoint / "state.pt")


def test_planted_checkpoint_runs_no_code_and_names_the_file(data, tmp_path):
    clean = interrupted_run(data, tmp_path / "clean")
    shutil.copytree(tmp_path / "clean", tmp_path / "planted")
    planted = dataclasses.replace(clean, out=str(tmp_path / "planted"), resume=True)
    checkpoint = latest_checkpoint(tmp_path / "planted" / "checkpoints" / "distill")
    assert checkpoint is not None and checkpoint.name == "checkpoint_000002"
    marker = tmp_path / "pwned"
    plant(checkpoint, marker)

    # the payload is live: the old weights_only=False load ran it
    control = tmp_path / "control.pt"
    torch.save({"x": PlantedPayload(tmp_path / "control-ran")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control-ran").exists()

    with pytest.raises(CheckpointError) as raised:
        run_distill(planted, track=False)
    message = str(raised.value)
    assert not marker.exists(), "the planted checkpoint ran code on resume"
    assert str(checkpoint / "state.pt") in message and "\n" not in message, message
    assert "--no-resume" in message

    # the untouched copy resumes normally: steps 2-3 trained again from the checkpoint after step 2
    resumed = run_distill(dataclasses.replace(clean, resume=True), track=False)
    assert [line["step"] for line in resumed.log] == list(range(4))
    assert np.isfinite(losses(resumed)).all()
    assert not marker.exists()


def test_truncated_or_foreign_state_fails_with_the_file_name(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"\x80\x04garbage, not a checkpoint")
    with pytest.raises(CheckpointError, match=str(tmp_path / "state.pt")) as raised:
        load_state(tmp_path)
    assert "\n" not in str(raised.value)

    torch.save([torch.zeros(2)], tmp_path / "state.pt")  # loadable, but not ours
    with pytest.raises(CheckpointError, match="not a raysad checkpoint"):
        load_state(tmp_path)

    with pytest.raises(CheckpointError, match="state.pt"):  # missing
        load_state(tmp_path / "nowhere")

    # a plain pickle with a payload, no zip container: refused too, nothing run
    marker = tmp_path / "pwned"
    (tmp_path / "state.pt").write_bytes(pickle.dumps({"model": PlantedPayload(marker)}))
    with pytest.raises(CheckpointError, match=str(tmp_path / "state.pt")):
        load_state(tmp_path)
    assert not marker.exists()


def test_saved_state_loads_weights_only(data, tmp_path):
    """What _save_checkpoint writes (model, AdamW state, step, fingerprint) needs no unsafe unpickling."""
    cfg = config(data, tmp_path / "run", batch_size=4, micro_batch_size=2, max_steps=2, checkpoint_every=2)
    run_distill(cfg, track=False)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints" / "distill")
    state = load_state(checkpoint)
    assert state["step"] == 2 and state["optimizer"]["state"] and state["model"]
    assert all(isinstance(v, torch.Tensor) for v in state["model"].values())
