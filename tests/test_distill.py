"""raysad.distill: the three methods, offline and online teachers, resume, DDP equivalence, worker failures.

Data: expert HotPotQA trajectories (the env's scripted expert), a tokenizer trained on them, a tiny teacher
(random, its final norm scaled up so its distributions are peaked) and the teacher's top-k on every
generated token, from its forward pass over the encoded trajectory. Runs with workers=0 use Ray Train's
in-process mode (fast); the Ray tests start a 2-CPU Ray and real TorchTrainer workers (gloo).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from raysad import models
from raysad.data import collate, example_counts, load_examples, loss_masks
from raysad.distill import DistillConfig, run_distill
from raysad.train_loop import batch_loss, hidden_states
from raysad.policies.expert import expert_episodes
from raysad.agent_formats import get_format
from raysad.encoding import encode_trajectory
from raysad.trajectory import Trajectory
from raysad.trajectory_writer import TrajectoryWriter


# --------------------------------------------------------------------------------------------- data ----
def expert_trajectories(n: int) -> list[Trajectory]:
    # the question only (the env's full prompt is long: this keeps the tiny runs fast)
    return expert_episodes("hotpotqa", n, max_turns=6, prompt_chars=160, observation_chars=80)


def with_teacher_topk(trajs: list[Trajectory], teacher, tokenizer, k: int) -> list[Trajectory]:
    """Store token ids and the teacher's top-k log-probs per generated token, as a rollout with --topk does."""
    fmt = get_format("hotpotqa")
    for traj in trajs:
        for turn in traj.turns:
            thought = tokenizer(turn.thought + fmt.reason_end, add_special_tokens=False)["input_ids"]
            action = tokenizer(turn.action + fmt.act_end, add_special_tokens=False)["input_ids"]
            turn.token_ids, turn.num_thought_tokens = thought + action, len(thought)
        example = encode_trajectory(traj, tokenizer, fmt)
        with torch.no_grad():
            logp = teacher(torch.as_tensor(example["input_ids"])[None]).logits[0].float().log_softmax(-1)
        top = logp.topk(k, dim=-1)
        generated = np.nonzero(example["reason_mask"] | example["act_mask"])[0]  # turn by turn, in order
        j = 0
        for turn in traj.turns:
            rows = generated[j:j + len(turn.token_ids)] - 1  # row t predicts token t: logits of t - 1
            j += len(turn.token_ids)
            turn.topk_ids, turn.topk_logprobs = top.indices[rows].tolist(), top.values[rows].tolist()
    return trajs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs share 2 busy cores: one torch thread is faster than two fighting ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from raysad.sft import trajectory_texts

    root = tmp_path_factory.mktemp("distill")
    trajs = expert_trajectories(8)
    models.train_tokenizer(trajectory_texts(trajs), vocab_size=400, out_dir=root / "tok")
    tokenizer = models.load_tokenizer(root / "tok")
    teacher = models.build_tiny_model("tiny-1m", tokenizer, seed=123)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(8.0)  # peaked teacher distributions: something to learn
    teacher.save_pretrained(root / "teacher")
    models.save_tokenizer(tokenizer, root / "teacher")
    with TrajectoryWriter(root / "text.jsonl") as out:
        for traj in trajs:
            out.write(traj)
    with TrajectoryWriter(root / "topk.jsonl") as out:
        for traj in with_teacher_topk(trajs, teacher, tokenizer, k=8):
            out.write(traj)
    return root


def config(data, out, **overrides) -> DistillConfig:
    base = dict(trajectories=str(data / "topk.jsonl"), student="tiny-1m", tokenizer=str(data / "tok"),
                out=str(out), workers=0, batch_size=8, micro_batch_size=4, max_length=160, lr=3e-3,
                warmup_steps=2, max_steps=10, checkpoint_every=5, log_every=100, resume=False, seed=0)
    return DistillConfig(**{**base, **overrides})


def losses(result, key="loss") -> list[float]:
    return [line[key] for line in result.log]


_runs: dict[str, object] = {}


def cached_run(name, data, tmp_path_factory, **overrides):
    """One run per configuration for the whole module (several tests read the same run)."""
    if name not in _runs:
        _runs[name] = run_distill(config(data, tmp_path_factory.mktemp(name), **overrides), track=False)
    return _runs[name]


# ---------------------------------------------------------------------------------------- methods -----
@pytest.mark.parametrize("method", ["sad", "token_kd", "sft"])
def test_each_method_lowers_its_loss(data, tmp_path_factory, method):
    result = cached_run(method, data, tmp_path_factory, method=method)
    loss = losses(result)
    assert len(loss) == 10 and [line["step"] for line in result.log] == list(range(10))
    assert np.isfinite(loss).all()
    # batch_size 8 = all 8 trajectories: every step sees the same data, so the losses compare
    # KD falls towards 0; CE towards the data's entropy (several nats for a 1M-parameter student)
    assert loss[-1] < (0.85 if method == "sft" else 0.6) * loss[0], loss
    if method == "sft":  # imitation: the objective is the CE on reason ∪ act tokens
        assert loss == pytest.approx(losses(result, "ce_loss"), rel=1e-5)
    assert result.log[0]["reason_tokens"] > 0 and result.log[0]["act_tokens"] > 0


def test_sad_without_reason_weight_leaves_reason_tokens_alone(data, tmp_path_factory):
    with_reason = cached_run("sad", data, tmp_path_factory, method="sad")
    without = cached_run("sad_r0", data, tmp_path_factory, method="sad", lambda_reason=0.0)
    assert losses(without) != losses(with_reason)
    assert losses(without, "act_loss")[-1] < 0.6 * losses(without, "act_loss")[0]
    # without a weight the reason loss only falls through what reason and act tokens share (the teacher's
    # general preferences), clearly less than when it is optimised
    assert losses(with_reason, "reason_loss")[-1] < 0.9 * losses(without, "reason_loss")[-1]

    # and its gradient is exactly zero: d loss / d hidden at reason positions (the loss at position t
    # depends on the student's final hidden state at t only)
    cfg = config(data, "unused", lambda_reason=0.0)
    tokenizer = models.load_tokenizer(data / "tok")
    student = models.build_tiny_model("tiny-1m", tokenizer)
    batch = collate(load_examples(cfg, tokenizer)[:2], tokenizer.pad_token_id)
    hidden = hidden_states(student, batch["input_ids"], batch["attention_mask"], len(tokenizer))
    leaf = hidden.hidden[:, :-1].detach().requires_grad_(True)  # position t predicts token t + 1
    for lambda_reason, reason_grad_is_zero in ((0.0, True), (1.0, False)):
        leaf.grad = None
        total, _ = batch_loss(type(hidden)(leaf, hidden.lm_head.detach()), None, batch,
                              dataclasses.replace(cfg, lambda_reason=lambda_reason))
        total.backward()
        reason = batch["reason_mask"] & batch["has_topk"]
        act = batch["act_mask"] & batch["has_topk"]
        assert bool((leaf.grad[reason] == 0).all()) == reason_grad_is_zero
        assert (leaf.grad[act].abs().sum(-1) > 0).all()


def test_hidden_states_give_the_models_logits(data):
    tokenizer = models.load_tokenizer(data / "tok")
    model = models.build_tiny_model("tiny-1m", tokenizer, seed=3)
    ids = torch.as_tensor([tokenizer("Thought 1: search the band.")["input_ids"]])
    states = hidden_states(model, ids, torch.ones_like(ids), len(tokenizer))
    torch.testing.assert_close(states.hidden @ states.lm_head.T, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_online_teacher(data, tmp_path, tmp_path_factory):
    result = run_distill(config(data, tmp_path / "online", trajectories=str(data / "text.jsonl"),
                                teacher=str(data / "teacher"), tokenizer=None, method="token_kd"), track=False)
    loss = losses(result)
    assert loss[-1] < 0.75 * loss[0], loss
    # same student, data and teacher: the full-vocabulary KD is at least the stored top-8 (+ tail) KD,
    # which is a lower bound of it
    offline = cached_run("token_kd", data, tmp_path_factory, method="token_kd")
    assert loss[0] >= losses(offline)[0] > 0.1 * loss[0]


def test_flat_kd_distils_every_token_after_the_prompt(data, tmp_path):
    """flat_kd (the paper's token-KD baseline as described): observations and format labels carry loss too, the
    prompt none; from the online teacher, or from rows stored at observation tokens too (next test): top-k
    stored at generated tokens only would make it token KD, so that fails in one line."""
    with pytest.raises(ValueError, match="flat_kd distils observation tokens.*--context-topk"):
        run_distill(config(data, tmp_path / "none", method="flat_kd"), track=False)
    cfg = config(data, tmp_path / "flat", trajectories=str(data / "text.jsonl"), teacher=str(data / "teacher"),
                 tokenizer=None, method="flat_kd")
    tokenizer = models.load_tokenizer(data / "tok")
    traj = expert_trajectories(1)[0]
    example = encode_trajectory(traj, tokenizer, get_format("hotpotqa"), max_length=cfg.max_length)
    batch = collate([example], tokenizer.pad_token_id)
    reason, rest = loss_masks(batch, cfg)
    segments = batch["reason_mask"] | batch["act_mask"]
    first = int(segments[0].nonzero()[0])
    assert not rest[0, :first].any() and not reason[0, :first].any()     # the prompt: no loss
    assert bool((reason | rest)[0, first:].all())                         # everything after it: loss
    assert int(rest.sum()) > int(batch["act_mask"].sum())                 # observations are in
    assert not (reason & rest).any()
    observation_text = tokenizer.decode(batch["labels"][0][rest[0] & ~batch["act_mask"][0]])
    assert traj.turns[0].observation.split()[0] in observation_text
    assert sum(example_counts(example, cfg)[:2]) == int((reason | rest).sum())

    result = run_distill(cfg, track=False)
    loss = losses(result)
    assert loss[-1] < 0.75 * loss[0], loss
    token_kd = run_distill(dataclasses.replace(cfg, method="token_kd", out=str(tmp_path / "tok_kd"), max_steps=1),
                           track=False)
    assert result.log[0]["act_tokens"] > token_kd.log[0]["act_tokens"]


def test_flat_kd_from_rows_stored_at_every_token_equals_the_online_teacher(data, tmp_path):
    """Trajectories scored by the teacher at every token after the first generated one (raysad.scoring, what
    rollout --context-topk stores), with the whole vocabulary as top-k: offline flat KD is then the online
    teacher's flat KD, step for step (the same student, data and order)."""
    from raysad.policies.hf import HFEngine
    from raysad.scoring import CONTEXT_TOPK, score_trajectories
    from raysad.trajectory_reader import read_trajectories

    tokenizer = models.load_tokenizer(data / "tok")
    engine = HFEngine(models.load_model(data / "teacher"), tokenizer, prefix_cache=0)
    trajs = list(read_trajectories(data / "topk.jsonl"))
    score_trajectories(trajs, tokenizer, engine, len(tokenizer), context=True)
    assert all(t.extra[CONTEXT_TOPK]["positions"] for t in trajs)
    with TrajectoryWriter(tmp_path / "scored.jsonl") as out:
        for traj in trajs:
            out.write(traj)
    # (no cut: a cut prompt would change what the online teacher reads, not what was stored)
    common = dict(trajectories=str(tmp_path / "scored.jsonl"), method="flat_kd", max_steps=2, max_length=1024)
    offline = run_distill(config(data, tmp_path / "offline", **common), track=False)
    online = run_distill(config(data, tmp_path / "online", teacher=str(data / "teacher"), tokenizer=None,
                                **common), track=False)
    for key in ("reason_tokens", "act_tokens"):
        assert [line[key] for line in offline.log] == [line[key] for line in online.log]
    for key in ("loss", "reason_loss", "act_loss"):
        assert losses(offline, key) == pytest.approx(losses(online, key), rel=1e-3), key
    # a file scored with another encoding (here: a length that does not match) fails, naming it
    trajs[0].extra[CONTEXT_TOPK]["length"] += 1
    with pytest.raises(ValueError, match="field 'context_topk': scored on .* tokens, this encoding has"):
        encode_trajectory(trajs[0], tokenizer)


def test_clear_errors_without_teacher_signal_or_with_another_tokenizer(data, tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        run_distill(config(data, tmp_path / "a", trajectories=str(data / "text.jsonl")), track=False)
    other = models.train_tokenizer(["a completely different corpus of text"] * 20, vocab_size=300,
                                   out_dir=tmp_path / "other_tok")
    models.build_tiny_model("tiny-1m", other).save_pretrained(tmp_path / "other_teacher")
    models.save_tokenizer(other, tmp_path / "other_teacher")
    with pytest.raises(models.TokenizerMismatch, match="tokenizer"):
        run_distill(config(data, tmp_path / "b", teacher=str(tmp_path / "other_teacher")), track=False)


# ------------------------------------------------------------------------------ outputs and tracking ----
def test_saved_student_loads_and_mlflow_has_the_run(data, tmp_path):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_distill(config(data, tmp_path / "student", max_steps=3, tracking_uri=uri, experiment="t"))
    model = AutoModelForCausalLM.from_pretrained(result.out)
    tokenizer = AutoTokenizer.from_pretrained(result.out)
    assert tokenizer.get_vocab() == models.load_tokenizer(data / "tok").get_vocab()
    ids = torch.as_tensor([tokenizer("Thought 1: I need")["input_ids"]])
    assert model(ids).logits.shape[-1] == len(tokenizer)

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.run_id)
    assert run.data.tags["method"] == "sad" and run.data.tags["model_path"] == str(result.out)
    assert run.data.params["lambda_act"] == "1.0"
    # no test hook and no unset field among the params (an unset one used to be the string 'None')
    assert "fail_once_at_step" not in run.data.params and "None" not in run.data.params.values()
    history = client.get_metric_history(result.run_id, "distill/loss")
    assert [m.value for m in history] == pytest.approx(losses(result))
    for name in ("reason_loss", "act_loss", "ce_loss", "reason_tokens", "act_tokens", "lr", "tokens_per_s",
                 "grad_norm"):
        assert len(client.get_metric_history(result.run_id, f"distill/{name}")) == 3
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert "model/config.json" in artifacts and "model/train_log.jsonl" in artifacts
    assert not any(path.endswith(".safetensors") for path in artifacts)
    # the labels a hand-run evaluate reads, so the report names the method, λs and seed (sad+curriculum apart)
    from raysad.evaluate import EvalConfig, student_params
    from raysad.report import method_label

    labels = json.loads((result.out / "raysad.json").read_text())
    assert labels == {"method": "sad", "lambda_reason": 1.0, "lambda_act": 1.0, "divergence": "forward_kl",
                      "seed": 0}
    assert student_params(EvalConfig(env="hotpotqa", policy="hf", model=str(result.out)))["method"] == "sad"
    assert method_label("sad", curriculum=True) == "sad+curriculum" and method_label("sft") == "sft"


def test_cli_with_yaml_config(data, tmp_path):
    from raysad.cli import app

    yaml_path = tmp_path / "distill.yaml"
    yaml_path.write_text(yaml.safe_dump({"trajectories": str(data / "text.jsonl"), "student": "tiny-1m",
                                         "tokenizer": str(data / "tok"), "method": "sft", "max-length": 96,
                                         "max_steps": 2, "batch_size": 4, "workers": 0}))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    result = CliRunner().invoke(app, ["distill", "--config", str(yaml_path), "--out", str(tmp_path / "s"),
                                      "--micro-batch-size", "2"], env=env)
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and (tmp_path / "s" / "config.json").is_file()
    bad = CliRunner().invoke(app, ["distill", "--config", str(yaml_path), "--method", "nope"], env=env)
    assert bad.exit_code == 2 and "method" in bad.output


def test_micro_batches_pad_less_and_leave_the_update_unchanged(data, tmp_path):
    # the 8-trajectory batch in one micro-batch, then in 8 of one (no padding): the gradient is a sum over
    # micro-batches, so the losses and the trained weights agree; only the padded positions differ
    whole = run_distill(config(data, tmp_path / "whole", micro_batch_size=8, max_steps=3), track=False)
    single = run_distill(config(data, tmp_path / "single", micro_batch_size=1, max_steps=3), track=False)
    assert losses(single) == pytest.approx(losses(whole), rel=1e-4)
    assert all(line["pad_frac"] > 0.05 for line in whole.log)  # expert episodes differ in length
    assert all(line["pad_frac"] == 0.0 for line in single.log)
    assert losses(single, "tokens") == losses(whole, "tokens")  # real tokens, counted alike
    a = models.load_model(whole.out, device="cpu").state_dict()
    b = models.load_model(single.out, device="cpu").state_dict()
    # AdamW moves a weight by up to ~lr per step whatever its gradient's size, so where a gradient sits near zero
    # the summation order's float noise becomes an update difference (1.1e-5 on 1 of 4,608 weights on an AMD EPYC,
    # none on the Intel boxes before): within 1% of the most any weight can move in these 3 steps
    atol = 0.01 * 3e-3 * 3
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol)


# -------------------------------------------------------------------------------------------- resume ----
def test_resume_continues_exactly_where_the_checkpoint_left(data, tmp_path):
    common = dict(batch_size=4, micro_batch_size=2, max_steps=6, checkpoint_every=3)
    straight = run_distill(config(data, tmp_path / "straight", **common), track=False)
    interrupted = config(data, tmp_path / "interrupted", **common, fail_once_at_step=5)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distill(interrupted, track=False)
    assert len((tmp_path / "interrupted" / "train_log.jsonl").read_text().splitlines()) == 4  # steps 0-3
    resumed = run_distill(dataclasses.replace(interrupted, resume=True), track=False)
    assert [line["step"] for line in resumed.log] == list(range(6))
    # steps 3-5 were trained again from the checkpoint after step 3: same batches, optimizer and weights
    assert losses(resumed) == pytest.approx(losses(straight), rel=1e-5, abs=1e-7)
    # a changed setting is not silently resumed
    with pytest.raises(ValueError, match="cannot resume"):
        run_distill(dataclasses.replace(interrupted, resume=True, lr=1e-3), track=False)


def test_a_resumed_run_continues_its_mlflow_run(data, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    interrupted = config(data, tmp_path / "s", batch_size=4, micro_batch_size=2, max_steps=6, checkpoint_every=3,
                         fail_once_at_step=5, tracking_uri=uri, experiment="resume")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distill(interrupted)
    resumed = run_distill(dataclasses.replace(interrupted, resume=True))
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("resume").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == resumed.run_id  # one run per student, not per attempt
    assert runs[0].info.status == "FINISHED"
    history = mlflow.MlflowClient(tracking_uri=uri).get_metric_history(resumed.run_id, "distill/loss")
    # steps 3 and 4 ran twice (before the failure and after the resume from step 3): logged once each
    assert sorted(m.step for m in history) == list(range(6))


def test_resume_over_other_content_under_the_same_path_is_refused(data, tmp_path):
    """The checkpoint keys on the trajectories' content, not their path: new rows written to the same file
    are not "resumed" as if they were the data the checkpoint was trained on."""
    import shutil

    path = tmp_path / "t.jsonl"
    shutil.copy(data / "topk.jsonl", path)
    run = config(data, tmp_path / "s", trajectories=str(path), max_steps=6, checkpoint_every=3, fail_once_at_step=5)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_distill(run, track=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[::-1]) + "\n")  # the same trajectories, another order: other content
    with pytest.raises(ValueError, match="cannot resume.*trajectories_sha256"):
        run_distill(dataclasses.replace(run, resume=True), track=False)
    shutil.copy(data / "topk.jsonl", path)  # the content it was trained on: resumes
    resumed = run_distill(dataclasses.replace(run, resume=True), track=False)
    assert [line["step"] for line in resumed.log] == list(range(6))


# ------------------------------------------------------------------------------------------ Ray Train ----
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def ray_config(data, out, workers, **overrides):
    return config(data, out, workers=workers, batch_size=4, micro_batch_size=1, max_steps=4,
                  checkpoint_every=2, **overrides)


@pytest.fixture(scope="module")
def two_workers(data, tmp_path_factory, ray_cluster):
    return run_distill(ray_config(data, tmp_path_factory.mktemp("two"), 2), track=False)


@pytest.mark.multiworker
def test_two_workers_match_one_on_the_same_global_batch(data, tmp_path_factory, two_workers):
    # one worker (in-process) accumulates 4 micro-batches; two Ray workers take examples 0, 2 and 1, 3 of
    # each batch, accumulate 2 micro-batches each and average their gradients (DDP over gloo)
    one = run_distill(ray_config(data, tmp_path_factory.mktemp("one"), 0), track=False)
    two = two_workers
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert losses(two, "grad_norm") == pytest.approx(losses(one, "grad_norm"), rel=1e-3)
    a = models.load_model(one.out, device="cpu").state_dict()
    b = models.load_model(two.out, device="cpu").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.multiworker
def test_a_failing_worker_is_replaced_and_training_resumes(data, tmp_path_factory, two_workers):
    out = tmp_path_factory.mktemp("fault")
    result = run_distill(ray_config(data, out, 2, fail_once_at_step=3, max_failures=1), track=False)
    assert (out / ".injected_failure").is_file()  # rank 1 did raise
    assert [line["step"] for line in result.log] == [0, 1, 2, 3]
    # restarted from the checkpoint after step 2: the same numbers as the run without failure
    assert losses(result) == pytest.approx(losses(two_workers), rel=1e-4)


@pytest.mark.multiworker
def test_fsdp_two_workers_match_one(data, tmp_path_factory, ray_cluster):
    one = run_distill(ray_config(data, tmp_path_factory.mktemp("fsdp_one"), 0), track=False)
    two = run_distill(ray_config(data, tmp_path_factory.mktemp("fsdp_two"), 2, strategy="fsdp"), track=False)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    a = models.load_model(one.out, device="cpu").state_dict()
    b = models.load_model(two.out, device="cpu").state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
