"""raysad.sft: teacher fine-tuning on a handful of hand-written expert trajectories."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from raysad import models
from raysad.cli import app
from raysad.segments import encode_trajectory, get_format
from raysad.sft import SFTConfig, run_sft, train_tokenizer_from_trajectories
from raysad.trajectory import Trajectory, TrajectoryWriter, Turn


def hotpot_trajectory(n: int) -> Trajectory:
    item, price = 7 * n, 3 * n + 1
    turns = [Turn(f"I need the price of item {item}.", f"Search[item {item}]",
                  f"Item {item} costs {price} dollars."),
             Turn(f"Item {item} costs {price} dollars, so the answer is {price}.", f"Finish[{price}]",
                  "Episode finished, reward = 1")]
    return Trajectory(id=f"t{n}", env="hotpotqa", task_id=f"q{n}", split="train",
                      instruction=f"What is the price of item {item}?",
                      prompt=f"Solve the question with Search and Finish.\nQuestion: What is the price of item {item}?",
                      turns=turns, reward=1.0, success=True, policy={"backend": "expert", "model": "expert"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "expert.jsonl"
    with TrajectoryWriter(path) as writer:
        for n in range(6):
            writer.write(hotpot_trajectory(n))
    return path


def act_loss(model_dir, data_path) -> float:
    """Mean CE of the saved model on the reason+act tokens of the data (independent of the training loop)."""
    from raysad.trajectory import read_trajectories

    model, tok = models.load_model(model_dir, device="cpu"), models.load_tokenizer(model_dir)
    total, count = 0.0, 0
    for traj in read_trajectories(data_path):
        ex = encode_trajectory(traj, tok, get_format("hotpotqa"))
        ids = torch.as_tensor(ex["input_ids"])[None]
        mask = torch.as_tensor(ex["reason_mask"] | ex["act_mask"])[1:]
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].log_softmax(-1)
        nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
        total, count = total + float(nll[mask].sum()), count + int(mask.sum())
    return total / count


def test_sft_loss_decreases_and_model_reloads(tmp_path, data):
    base = dict(trajectories=str(data), model="tiny-1m", vocab_size=300, batch_size=3, lr=5e-3,
                warmup_steps=2, seed=0, device="cpu")
    before = run_sft(SFTConfig(**dict(base, lr=0.0), out=str(tmp_path / "m0"), max_steps=1), track=False,
                     progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_sft(SFTConfig(**base, out=str(tmp_path / "m"), epochs=8, tracking_uri=uri, experiment="t"),
                  progress=False)
    assert act_loss(out, data) < 0.7 * act_loss(before, data)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    history = [m.value for m in client.get_metric_history(run.info.run_id, "sft/loss")]
    assert len(history) == 16  # 6 trajectories / batch 3 = 2 steps per epoch, 8 epochs
    assert sum(history[-4:]) < 0.75 * sum(history[:4])
    assert run.data.params["model"] == "tiny-1m"

    # the saved directory is a normal HF model + tokenizer: fine-tune it again from there
    again = run_sft(SFTConfig(**dict(base, model=str(out)), out=str(tmp_path / "m2"), max_steps=1), track=False,
                    progress=False)
    assert models.load_tokenizer(again).get_vocab() == models.load_tokenizer(out).get_vocab()


def test_tokenizer_from_trajectories_covers_their_text(tmp_path, data):
    tok = train_tokenizer_from_trajectories(data, vocab_size=300, out_dir=tmp_path / "tok")
    reloaded = models.load_tokenizer(tmp_path / "tok")
    text = "Thought 1: I need the price of item 14.\nAction 1: Search[item 14]\n"
    assert reloaded.encode(text) == tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < 0.75 * len(text)  # merges learnt from the trajectories' phrases


def test_cli_sft_errors_name_the_problem(tmp_path, data):
    result = CliRunner().invoke(app, ["sft", "--trajectories", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output
    result = CliRunner().invoke(app, ["sft", "--trajectories", str(data), "--model", "tiny-7m"])
    assert result.exit_code == 2 and "tiny-7m" in result.output and "tiny-5m" in result.output
    assert not (tmp_path / "runs").exists()
