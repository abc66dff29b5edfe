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
    seed: int = typer.Option(0, "--seed", help="Seed for the task draw and the environment."),
    expert: bool = typer.Option(False, "--expert", help="Let the scripted expert play and print its trajectory."),
    few_shot: int = typer.Option(0, "--few-shot", help="ReAct examples to show in the printed prompt."),
) -> None:
    """Play an environment in the terminal (type actions), or watch the expert with --expert."""
    from raysad.envs_cli import play

    play(env, split=split, task_id=task_id, data=data, seed=seed, expert=expert, few_shot=few_shot)


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
    few_shot: Optional[int] = typer.Option(None, "--few-shot", help="ReAct examples in the prompt.", show_default="0"),
    topk: Optional[int] = typer.Option(None, "--topk", help="Keep the teacher's top-k logprobs per generated token (0 = none).", show_default="0"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Token budget per thought and per action.", show_default="128"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature, 0 = greedy.", show_default="0"),
    env_actors: Optional[int] = typer.Option(None, "--env-actors", help="Ray actors stepping environments.", show_default="2"),
    envs_per_actor: Optional[int] = typer.Option(None, "--envs-per-actor", help="Environments per actor, batched into one engine request.", show_default="4"),
    engines: Optional[int] = typer.Option(None, "--engines", help="Teacher engine actors (one model copy each).", show_default="1"),
    tensor_parallel: Optional[int] = typer.Option(None, "--tensor-parallel", help="vLLM tensor-parallel GPUs per engine.", show_default="1"),
    gpus_per_engine: Optional[float] = typer.Option(None, "--gpus-per-engine", help="GPUs per engine.", show_default="tensor-parallel for vllm, 1 for hf on a GPU cluster"),
    only_success: Optional[bool] = typer.Option(None, "--only-success/--keep-failures", help="Write successful episodes only.", show_default="keep all"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for env resets and sampling.", show_default="0"),
    out: Optional[str] = typer.Option(None, "--out", help="Output .jsonl or .parquet; rerunning resumes it.", show_default="trajectories.jsonl"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="raysad"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster ('auto' or host:port).", show_default="$RAY_ADDRESS, else a local Ray"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Play environment episodes with a teacher on a Ray actor pool and write trajectories (resumable)."""
    from raysad.config import ConfigError
    from raysad.rollout import main

    flags = {k: v for k, v in locals().items() if k not in ("config", "ConfigError", "main")}
    try:
        main(config, **flags)
    except (ConfigError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None

# --- commands end ---


def main() -> None:  # pragma: no cover
    app()
