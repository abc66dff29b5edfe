"""raysad.sft: teacher fine-tuning (the distill trainer, method sft) on a handful of hand-written expert
trajectories."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from raysad import models
from raysad.cli import app
from raysad.agent_formats import get_format
from raysad.encoding import encode_trajectory
from raysad.sft import SFTConfig, run_sft, train_tokenizer_from_trajectories
from raysad.trajectory import Trajectory, Turn
from raysad.trajectory_writer import TrajectoryWriter


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
    """Mean CE of a saved model on the reason+act tokens of the data (independent of the training loop),
    loaded the plain Hugging Face way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raysad.trajectory_reader import read_trajectories

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
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


BASE = dict(model="tiny-1m", vocab_size=300, batch_size=3, lr=5e-3, warmup_steps=2, seed=0, device="cpu")


def test_sft_loss_decreases_and_model_reloads(tmp_path, data, capfd):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_sft(SFTConfig(**BASE, trajectories=str(data), out=str(tmp_path / "m"), epochs=8, tracking_uri=uri,
                            experiment="t"))
    # the random init it started from is kept beside the checkpoints: training cut the loss on the data
    init = tmp_path / "m" / "checkpoints" / "init" / "tiny-1m"
    assert act_loss(out, data) < 0.7 * act_loss(init, data)
    assert "distill step 10/16" in capfd.readouterr().out  # a progress line every 10 steps

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 16  # 6 trajectories / batch 3 = 2 steps per epoch, 8 epochs
    assert sum(x["loss"] for x in log[-4:]) < 0.75 * sum(x["loss"] for x in log[:4])

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    assert run.info.run_name == "sft" and run.data.tags["method"] == "sft" and run.data.tags["stage"] == "sft"
    assert run.data.tags["student_size"] == "tiny-1m" and run.data.params["method"] == "sft"
    history = [m.value for m in client.get_metric_history(run.info.run_id, "distill/loss")]
    assert history == pytest.approx([x["loss"] for x in log])

    # the same --out resumes its run; with another tokenizer it cannot, and says so before training
    with pytest.raises(ValueError, match="another tokenizer"):
        run_sft(SFTConfig(**dict(BASE, vocab_size=280), trajectories=str(data), out=str(out), epochs=8), track=False)

    # the saved directory is a normal HF model + tokenizer: fine-tune it again from there
    again = run_sft(SFTConfig(**dict(BASE, model=str(out)), trajectories=str(data), out=str(tmp_path / "m2"),
                              max_steps=1), track=False, progress=False)
    assert models.load_tokenizer(again).get_vocab() == models.load_tokenizer(out).get_vocab()
    assert not (again / "checkpoints" / "init").exists()  # a model directory needs no init


def test_tokenizer_from_trajectories_covers_their_text(tmp_path, data):
    tok = train_tokenizer_from_trajectories(data, vocab_size=300, out_dir=tmp_path / "tok")
    reloaded = models.load_tokenizer(tmp_path / "tok")
    text = "Thought 1: I need the price of item 14.\nAction 1: Search[item 14]\n"
    assert reloaded.encode(text) == tok.encode(text) and tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < 0.75 * len(text)  # merges learnt from the trajectories' phrases


def test_cli_sft_trains_from_yaml_and_flags(tmp_path, data):
    """A tiny size name with a given tokenizer: the model gets that tokenizer (none is trained here)."""
    train_tokenizer_from_trajectories(data, vocab_size=280, out_dir=tmp_path / "tok")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"trajectories": str(data), "model": "tiny-1m", "batch_size": 3,
                                      "max_length": 128, "tokenizer": str(tmp_path / "tok")}))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = CliRunner().invoke(app, ["sft", "--config", str(config), "--max-steps", "2", "--device", "cpu",
                                      "--out", str(tmp_path / "m"), "--experiment", "cli"], env=env)
    assert result.exit_code == 0, result.output
    assert "saved to" in result.output and (tmp_path / "m" / "config.json").is_file()
    assert len((tmp_path / "m" / "train_log.jsonl").read_text().splitlines()) == 2
    assert models.load_tokenizer(tmp_path / "m").get_vocab() == models.load_tokenizer(tmp_path / "tok").get_vocab()


def test_cli_sft_errors_name_the_problem(tmp_path, data):
    result = CliRunner().invoke(app, ["sft", "--trajectories", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "missing.jsonl" in result.output
    result = CliRunner().invoke(app, ["sft", "--trajectories", str(data), "--model", "tiny-7m"])
    assert result.exit_code == 2 and "tiny-7m" in result.output and "tiny-5m" in result.output
    result = CliRunner().invoke(app, ["sft", "--trajectories", str(data), "--model", "tiny-1m", "--device", "cuda:1",
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "cuda:1" in result.output
    result = CliRunner().invoke(app, ["sft", "--trajectories", str(data), "--model", "tiny-1m", "--workers", "-1",
                                      "--out", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "workers" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sft_on_ray_train_workers(tmp_path, data):
    out = run_sft(SFTConfig(**BASE, trajectories=str(data), out=str(tmp_path / "m"), max_steps=4, workers=2),
                  track=False, progress=False)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and (out / "config.json").is_file()
