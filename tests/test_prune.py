"""raysad.prune: structured pruning of MLP channels and (GQA) attention heads on tiny Llama models."""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from raysad import models
from raysad.cli import app
from raysad.prune import PruneConfig, calibration_batches, kept_sizes, prune_model, run_prune
from raysad.sft import train_tokenizer_from_trajectories
from raysad.trajectory import Trajectory, Turn
from raysad.trajectory_writer import TrajectoryWriter

SMALL = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # head_dim 16, 2 query heads per k/v head
WIDE_GROUPS = dict(hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
                   num_key_value_heads=2)  # head_dim 16, 3 query heads per k/v head


def hotpot_trajectory(n: int) -> Trajectory:
    item, price = 7 * n, 3 * n + 1
    turns = [Turn(f"I need the price of item {item}.", f"Search[item {item}]", f"Item {item} costs {price} dollars."),
             Turn(f"So the answer is {price}.", f"Finish[{price}]", "Episode finished, reward = 1")]
    return Trajectory(id=f"t{n}", env="hotpotqa", task_id=f"q{n}", split="train",
                      instruction=f"What is the price of item {item}?",
                      prompt=f"Answer with Search and Finish.\nQuestion: What is the price of item {item}?",
                      turns=turns, reward=1.0, success=True, policy={"backend": "expert", "model": "expert"})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("prune") / "trajs.jsonl"
    with TrajectoryWriter(path) as writer:
        for n in range(8):
            writer.write(hotpot_trajectory(n))
    return path


@pytest.fixture(scope="module")
def tokenizer(data):
    return train_tokenizer_from_trajectories(data, vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("prune") / "student"
    models.build_tiny_model(SMALL, tokenizer, seed=0).save_pretrained(out)
    models.save_tokenizer(tokenizer, out)
    return out


def llama_params(vocab: int, hidden: int, layers: int, mlp: int, heads: int, kv: int, head_dim: int) -> int:
    """Parameter count of a tied-embedding Llama, by hand from its shapes."""
    attention = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o; k, v
    per_layer = attention + 3 * hidden * mlp + 2 * hidden                  # gate, up, down; two RMSNorms
    return vocab * hidden + layers * per_layer + hidden                     # embeddings; final norm


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(["Thought 1: I need the price of item 14.\nAction 1: Search[item 14]\n",
                     "Question: What is the price"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_kept_sizes_follow_the_ratio():
    tiny5m = dict(models.TINY_SIZES["tiny-5m"])  # 640 channels, 6 heads, 2 kv heads
    cfg = type("Cfg", (), tiny5m)
    assert kept_sizes(cfg, 0.25) == dict(intermediate_size=480, num_attention_heads=4, num_key_value_heads=2)
    assert kept_sizes(cfg, 0.5) == dict(intermediate_size=320, num_attention_heads=3, num_key_value_heads=1)
    assert kept_sizes(cfg, 0.0) == dict(intermediate_size=640, num_attention_heads=6, num_key_value_heads=2)
    cfg.intermediate_size = 256
    assert kept_sizes(cfg, 0.3)["intermediate_size"] == 176  # 179.2 -> a multiple of 8
    assert kept_sizes(cfg, 0.3, round_to=1)["intermediate_size"] == 179
    assert kept_sizes(cfg, 0.5, prune_heads=False)["num_attention_heads"] == 6
    assert kept_sizes(cfg, 0.5, prune_mlp=False)["intermediate_size"] == 256


def test_pruned_model_has_the_promised_size_reloads_and_generates(tmp_path, model_dir, tokenizer):
    result = run_prune(PruneConfig(model=str(model_dir), out=str(tmp_path / "p"), ratio=0.5, device="cpu"),
                       track=False, progress=False)
    vocab = len(tokenizer)
    assert result["params_before"] == llama_params(vocab, 64, 2, mlp=256, heads=4, kv=2, head_dim=16)
    expected = llama_params(vocab, 64, 2, mlp=128, heads=2, kv=1, head_dim=16)
    assert result["params_after"] == expected
    assert result["fraction_removed"] == pytest.approx(1 - expected / result["params_before"])

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert models.parameter_count(reloaded) == expected
    config = reloaded.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (128, 2, 1, 16)
    attn = reloaded.model.layers[1].self_attn
    assert attn.q_proj.weight.shape == (32, 64) and attn.k_proj.weight.shape == (16, 64)
    assert attn.o_proj.weight.shape == (64, 32) and reloaded.model.layers[1].mlp.down_proj.weight.shape == (64, 128)

    # what was saved is what pruning in memory gives
    in_memory = models.load_model(model_dir, device="cpu")
    prune_model(in_memory, 0.5)
    assert torch.allclose(logits(reloaded, tokenizer), logits(in_memory, tokenizer), atol=1e-6)

    prompt = tokenizer("Question: What is the price", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 6
    assert models.load_tokenizer(tmp_path / "p").get_vocab() == tokenizer.get_vocab()


def test_ratio_zero_is_the_identity(tmp_path, model_dir, tokenizer):
    result = run_prune(PruneConfig(model=str(model_dir), out=str(tmp_path / "same"), ratio=0.0, device="cpu"),
                       track=False, progress=False)
    assert result["params_after"] == result["params_before"]
    original = models.load_model(model_dir, device="cpu")
    reloaded = models.load_model(tmp_path / "same", device="cpu")
    assert torch.equal(logits(reloaded, tokenizer), logits(original, tokenizer))


def _zero_mlp_channels(mlp, channels):
    mlp.gate_proj.weight[channels] = 0
    mlp.up_proj.weight[channels] = 0
    mlp.down_proj.weight[:, channels] = 0


def _zero_query_head(attn, head, d=16):
    attn.q_proj.weight[head * d:(head + 1) * d] = 0
    attn.o_proj.weight[:, head * d:(head + 1) * d] = 0


def kill_channels(model, shape: str, seed: int = 0) -> list[dict]:
    """Zero the weights of the MLP channels and heads that pruning at the shape's ratio should remove;
    returns the plan that must come out (kept channels / heads per layer)."""
    gen = torch.Generator().manual_seed(seed)
    width = model.config.intermediate_size
    keep = kept_sizes(model.config, RATIO[shape])
    plan = []
    with torch.no_grad():
        for layer in model.model.layers:
            channels = sorted(torch.randperm(width, generator=gen)[:width - keep["intermediate_size"]].tolist())
            _zero_mlp_channels(layer.mlp, channels)
            attn = layer.self_attn
            if shape == "kv_groups":  # 4 heads / 2 kv -> 2 / 1: a whole k/v group is dead
                group = int(torch.randint(0, 2, (), generator=gen))
                attn.k_proj.weight[group * 16:(group + 1) * 16] = 0
                attn.v_proj.weight[group * 16:(group + 1) * 16] = 0
                for head in (2 * group, 2 * group + 1):
                    _zero_query_head(attn, head)
                heads, kv = [h for h in range(4) if h // 2 != group], [1 - group]
            else:  # 6 heads / 2 kv -> 4 / 2: one query head per group is dead
                dead_heads = [int(torch.randint(0, 3, (), generator=gen)) + 3 * j for j in range(2)]
                for head in dead_heads:
                    _zero_query_head(attn, head)
                heads, kv = [h for h in range(6) if h not in dead_heads], [0, 1]
            plan.append({"mlp": [c for c in range(width) if c not in channels], "heads": heads, "kv_heads": kv})
    return plan


RATIO = {"kv_groups": 0.5, "heads_in_groups": 0.25}
SHAPE = {"kv_groups": SMALL, "heads_in_groups": WIDE_GROUPS}


@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
@pytest.mark.parametrize("shape", ["kv_groups", "heads_in_groups"])
def test_pruning_zeroed_channels_keeps_outputs(shape, importance, tokenizer, data):
    """Channels and heads whose weights are zero contribute nothing: importance must pick exactly them, and
    slicing them out must leave the logits unchanged (this checks every index of the slicing)."""
    model = models.build_tiny_model(SHAPE[shape], tokenizer, seed=1)
    dead = kill_channels(model, shape)
    before = logits(model, tokenizer)
    batches = calibration_batches(PruneConfig(model="unused", trajectories=str(data), batch_size=4), tokenizer) \
        if importance == "taylor" else None

    plan = prune_model(model, RATIO[shape], importance, batches)

    assert plan == dead
    assert torch.allclose(logits(model, tokenizer), before, atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_qwen2_with_attention_biases_prunes_and_reloads(tmp_path, tokenizer):
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, **SMALL)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    dead = kill_channels(model, "kv_groups", seed=5)
    before = logits(model, tokenizer)

    assert prune_model(model, 0.5) == dead
    assert torch.allclose(logits(model, tokenizer), before, atol=1e-5)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias.shape == (32,) and attn.k_proj.bias.shape == attn.v_proj.bias.shape == (16,)
    model.save_pretrained(tmp_path / "qwen")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    assert type(reloaded).__name__ == "Qwen2ForCausalLM"
    assert torch.allclose(logits(reloaded, tokenizer), before, atol=1e-5)


def test_taylor_sees_what_magnitude_cannot(tokenizer, data):
    """Channels with large gate/up weights but a zero down_proj column look important by magnitude and are
    worthless by Taylor (no gradient reaches them, their output is multiplied by zero)."""
    model = models.build_tiny_model(SMALL, tokenizer, seed=2)
    loud_dead = list(range(0, 256, 4))  # 64 channels; ratio 0.5 drops 128
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[loud_dead] *= 10
            layer.mlp.up_proj.weight[loud_dead] *= 10
            layer.mlp.down_proj.weight[:, loud_dead] = 0
    batches = calibration_batches(PruneConfig(model="unused", trajectories=str(data), batch_size=4), tokenizer)

    by_magnitude = prune_model(copy.deepcopy(model), 0.5, "magnitude", prune_heads=False)
    by_taylor = prune_model(copy.deepcopy(model), 0.5, "taylor", batches, prune_heads=False)

    for magnitude_layer, taylor_layer in zip(by_magnitude, by_taylor):
        assert set(loud_dead) <= set(magnitude_layer["mlp"])
        assert not set(loud_dead) & set(taylor_layer["mlp"])
        assert magnitude_layer["heads"] == taylor_layer["heads"] == [0, 1, 2, 3]


def test_cli_prune_taylor_logs_to_mlflow(tmp_path, model_dir, data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "prune.yaml"
    config.write_text(yaml.safe_dump({"tracking_uri": uri, "experiment": "prune-test", "calibration_batches": 2}))
    result = CliRunner().invoke(app, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "p"),
                                      "--ratio", "0.25", "--importance", "taylor", "--trajectories", str(data),
                                      "--device", "cpu", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "fewer" in result.output
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert reloaded.config.intermediate_size == 192 and reloaded.config.num_attention_heads == 4  # 4 heads/2 kv
    assert reloaded.config.num_key_value_heads == 2  # at 0.25 keep both groups, 2 query heads each

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("prune-test").experiment_id])[0]
    metrics = run.data.metrics
    assert metrics["prune/params_before"] == models.parameter_count(models.load_model(model_dir, device="cpu"))
    assert metrics["prune/params_after"] == models.parameter_count(reloaded)
    assert metrics["prune/ratio"] == 0.25
    assert metrics["prune/ppl_before"] > 1 and metrics["prune/ppl_after"] > 1
    assert run.data.params["importance"] == "taylor"


def test_cli_prune_bad_input_is_a_clear_error(tmp_path, model_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "p"),
                                 "--importance", "taylor"])
    assert result.exit_code == 2 and "--trajectories" in result.output
    result = runner.invoke(app, ["prune", "--model", str(model_dir), "--out", str(tmp_path / "p"), "--ratio", "1"])
    assert result.exit_code == 2 and "'ratio' must be in [0, 1)" in result.output
    result = runner.invoke(app, ["prune", "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "nowhere" in result.output
    assert not (tmp_path / "p").exists()


def mean_kl(teacher, student, batches) -> float:
    """KL(teacher || student) per reason ∪ act position of the calibration batches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mask = batch["reason_mask"] | batch["act_mask"]
            t = teacher(**inputs).logits[:, :-1][mask].log_softmax(-1)
            s = student(**inputs).logits[:, :-1][mask].log_softmax(-1)
            total += float((t.exp() * (t - s)).sum())
            count += int(mask.sum())
    return total / count


@pytest.mark.slow
def test_recovery_distillation_brings_the_pruned_model_back_toward_the_teacher(tmp_path, tokenizer, data):
    teacher = models.build_tiny_model(SMALL, tokenizer, seed=3)
    with torch.no_grad():
        teacher.model.norm.weight *= 6  # peaked predictions, so pruning visibly changes them
    teacher.save_pretrained(tmp_path / "teacher")
    models.save_tokenizer(tokenizer, tmp_path / "teacher")

    result = run_prune(PruneConfig(model=str(tmp_path / "teacher"), out=str(tmp_path / "p"), ratio=0.5,
                                   trajectories=str(data), recover_steps=12, recover_lr=3e-3, device="cpu",
                                   tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), progress=False)

    assert result["recover_steps"] == 12
    batches = calibration_batches(PruneConfig(model="unused", trajectories=str(data), batch_size=4), tokenizer)
    teacher = models.load_model(tmp_path / "teacher", device="cpu")
    pruned_only = models.load_model(tmp_path / "p" / "pruned", device="cpu")
    recovered = models.load_model(tmp_path / "p", device="cpu")
    assert models.parameter_count(recovered) == models.parameter_count(pruned_only) == result["params_after"]
    assert mean_kl(teacher, recovered, batches) < 0.8 * mean_kl(teacher, pruned_only, batches)
