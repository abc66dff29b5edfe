"""Every stage's config, composed from shared parts: one place for each field, its default and its help.

    Tracking      MLflow experiment, run name, tracking URI                  (every stage)
    RayCluster    which Ray to join or start                                 (rollout, evaluate, distill, sft)
    Tasks         which env, split and tasks are played                      (rollout, evaluate)
    Policy        the model that plays and how it samples                    (rollout, evaluate)
    Play          prompts, token budgets, env actors and engine actors       (rollout, evaluate)
    Training      the model's output, batch, length, steps, workers          (distill, sft)
    Workers       where Ray Train's workers run: GPUs, CPUs, resources, DDP/FSDP (distill, onpolicy)
    Optimizer     AdamW and its learning-rate schedule                       (distill, sft)
    Distillation  the teacher and the loss: method, λ_r, λ_a, divergence     (distill)

A config is one flat dataclass (YAML files and flags name fields without sections); `raysad <stage> --help`
is built from these fields (raysad/cli.py). Each part checks its own fields when a config is built
(`config.Checked`): numbers are range-checked with upper bounds where a bigger value would only exhaust memory
or hang, on the driver, before Ray starts or anything is written. Names mean one thing: `max_turns` is the
step limit of an episode (Tasks), `max_steps` a number of optimizer steps (Training).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from raysad.config import SEED_MAX, Checked, check_range, default_of, setting
from raysad.policies.base import ENV_SIDE_POLICIES


def _check_resources(config: Any, *names: str) -> None:
    from raysad.cluster import check_custom_resources

    for name in names:
        check_custom_resources(name, getattr(config, name))


# ------------------------------------------------------------------------------------------- parts ----
@dataclass(kw_only=True)
class Tracking(Checked):
    experiment: str = setting("raysad", "MLflow experiment.")
    run_name: str | None = setting(None, "MLflow run name.", shown="the stage and what it ran")
    tracking_uri: str | None = setting(None, "MLflow tracking URI.",
                                       shown="$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")


@dataclass(kw_only=True)
class RayCluster(Checked):
    ray_address: str | None = setting(None, "Join this Ray cluster ('auto' or host:port).",
                                      shown="$RAY_ADDRESS, else a local Ray")
    num_cpus: int | None = setting(None, "CPUs of a local Ray.", shown="all")

    def check(self) -> None:
        check_range("num_cpus", self.num_cpus, 1, optional=True)


@dataclass(kw_only=True)
class Tasks(Checked):
    RENAMED: ClassVar[dict[str, str]] = {"max_steps": "max_turns"}
    env: str = setting("webshop", "alfworld, hotpotqa, webshop, or a registered gymnasium id.")
    split: str = setting("train", "train, valid or test.")
    data: str | None = setting(None, "Real data path.", shown="the env's generated offline tasks")
    num_tasks: int | None = setting(None, "Tasks to generate (offline envs).", shown="the env's default")
    max_turns: int | None = setting(None, "Turns (env steps) per episode at most.", shown="the env's")
    episodes: int | None = setting(None, "Play the first N tasks of the split.", shown="all")
    task_ids: list[str] | None = setting(None, "Play exactly these tasks (comma-separated).")

    def check(self) -> None:
        # upper bounds: max_turns 10_000 per episode, num_tasks 1_000_000 generated tasks
        check_range("num_tasks", self.num_tasks, 1, 1_000_000, optional=True)
        check_range("max_turns", self.max_turns, 1, 10_000, optional=True)
        check_range("episodes", self.episodes, 1, optional=True)


@dataclass(kw_only=True)
class Policy(Checked):
    policy: Literal["expert", "random", "hf", "vllm", "openai"] = setting(
        "expert", "expert (scripted, no model), random (≈0 baseline), hf, vllm or openai (a model).")
    model: str | None = setting(None, "HF model directory (hf, vllm) or a served model's name (openai).")
    tokenizer: str | None = setting(
        None, "The model's tokenizer directory: contexts go to every engine as token ids (openai with a served "
              "name needs it); it also counts thought tokens a policy did not report.", shown="--model")
    topk: int = setting(0, "Keep the model's top-k logprobs per generated token (0 = none).")
    temperature: float = setting(0.0, "Sampling temperature, 0 = greedy.")

    def check(self) -> None:
        if self.policy not in ENV_SIDE_POLICIES and not self.model:
            raise ValueError(f"--policy {self.policy} needs --model")
        if self.policy == "openai" and not self.tokenizer and not (self.model and Path(self.model).is_dir()):
            raise ValueError("--policy openai needs --tokenizer DIR (the served model's tokenizer, a local copy): "
                             "contexts go to the server as token ids and come back as token ids")
        # topk: at most 1_000 logprobs stored per token
        check_range("topk", self.topk, 0, 1_000, why="0 = store no logprobs")
        check_range("temperature", self.temperature, 0, why="0 = greedy")


@dataclass(kw_only=True)
class Play(Checked):
    few_shot: int = setting(0, "ReAct examples in the prompt.")
    chat_template: bool = setting(False, "Wrap the prompt in the model's chat template (instruct models); turns "
                                         "follow as the assistant's text.")
    max_new_tokens: int | None = setting(
        None, "Token budget per thought and per action; a segment that hits it is closed, flagged and counted.",
        shown="the env's token_budget (fits its expert)")
    max_thought_tokens: int | None = setting(
        None, "Token budget per thought only (wins over --max-new-tokens for thoughts): a tight one keeps an "
              "untrained student from writing to the long budget real tasks need.", shown="--max-new-tokens")
    seed: int = setting(0, "Seed for env resets and sampling.")
    env_actors: int = setting(2, "Ray actors stepping environments.")
    envs_per_actor: int = setting(4, "Environments per actor, batched into one engine request.")
    engines: int = setting(1, "Engine actors (one model copy each).")
    tensor_parallel: int = setting(1, "vLLM tensor-parallel GPUs per engine.")
    gpus_per_engine: float | None = setting(None, "GPUs per engine.",
                                            shown="tensor-parallel for vllm, 1 for hf on a GPU cluster")
    cpus_per_engine: float | None = setting(None, "CPUs per engine.",
                                            shown="1, or for an engine without GPU all CPUs / engines")
    cpus_per_env_actor: float = setting(1.0, "CPUs per env actor (shrunk to what the engines leave, may be 0).")
    engine_resources: dict[str, float] = setting(
        factory=dict, help="Custom resources each engine asks for, k=v[,k=v]: pins engines to a node type, e.g. "
                           "teacher_engine=1 (cluster.yaml).", shown="none")
    env_actor_resources: dict[str, float] = setting(
        factory=dict, help="Custom resources each env actor asks for, k=v[,k=v].", shown="none")
    engine_batch_size: int = setting(32, "hf: prompts per forward pass.")
    batch_wait_s: float = setting(0.05, "An engine waits up to this long for all its envs' prompts.")
    engine_args: dict[str, Any] = setting(
        factory=dict, help="More engine keywords, k=v[,k=v] (vllm: max_model_len, gpu_memory_utilization, "
                           "dtype ...; hf: prefix_cache).", shown="none")
    max_restarts: int = setting(3, "Restarts of a dying env actor.")
    start_timeout_s: float = setting(
        900.0, "Seconds the engines and env actors have to come up (models load) before the run fails naming "
               "those still pending (a restart or start that waits for resources no node has free would "
               "otherwise wait forever); raise it for a large model.")
    max_attempts: int = setting(3, "Tries per episode before it is written with its error.")

    def check(self) -> None:
        # upper bounds: max_new_tokens 131_072 (the longest common context window), few_shot 32; one
        # actor/env/prompt each for the counts
        check_range("few_shot", self.few_shot, 0, 32)
        check_range("max_new_tokens", self.max_new_tokens, 1, 131_072, optional=True)
        check_range("max_thought_tokens", self.max_thought_tokens, 1, 131_072, optional=True)
        check_range("seed", self.seed, 0, SEED_MAX)
        check_range("env_actors", self.env_actors, 1, 4_096)
        check_range("envs_per_actor", self.envs_per_actor, 1, 4_096)
        check_range("engines", self.engines, 1, 1_024)
        check_range("tensor_parallel", self.tensor_parallel, 1, 1_024)
        check_range("gpus_per_engine", self.gpus_per_engine, 0, 1_024, optional=True)
        check_range("cpus_per_engine", self.cpus_per_engine, 0, 100_000, optional=True)
        check_range("cpus_per_env_actor", self.cpus_per_env_actor, 0, 100_000)
        check_range("engine_batch_size", self.engine_batch_size, 1, 65_536)
        check_range("batch_wait_s", self.batch_wait_s, 0, 3_600)
        check_range("max_restarts", self.max_restarts, 0, 1_000)
        check_range("start_timeout_s", self.start_timeout_s, 1, 86_400)
        check_range("max_attempts", self.max_attempts, 1, 1_000)
        _check_resources(self, "engine_resources", "env_actor_resources")


@dataclass(kw_only=True)
class Training(Checked):
    tokenizer: str | None = setting(None, "Tokenizer directory (for a tiny size-name student).",
                                    shown="the student's, else the teacher's")
    out: str = setting("runs/student", "Directory for the trained model (HF model + tokenizer), train_log.jsonl "
                                       "and checkpoints (the same --out again resumes).")
    epochs: int = setting(1, "Passes over the trajectories.")
    max_steps: int = setting(0, "Optimizer steps (0 = the epochs decide; more cycles the data).")
    batch_size: int = setting(8, "Global batch: trajectories per optimizer step, all workers together.")
    micro_batch_size: int = setting(4, "Trajectories per forward pass on a worker (gradient accumulation fills "
                                       "the batch).")
    max_length: int = setting(1024, "Tokens per trajectory: longer ones lose prompt tokens from the left first, "
                                    "then whole turns from the end (counted, logged as data/dropped_*).")
    seed: int = setting(0, "Seed for init and data order.")
    workers: int = setting(1, "Ray Train workers (0 = run in this process, no Ray cluster).")

    def check(self) -> None:
        # upper bounds: max_length 1_048_576 tokens, batch sizes 65_536 trajectories
        check_range("epochs", self.epochs, 1)
        check_range("max_steps", self.max_steps, 0, why="0 = the epochs decide")
        check_range("batch_size", self.batch_size, 1, 65_536)
        check_range("micro_batch_size", self.micro_batch_size, 1, 65_536)
        check_range("max_length", self.max_length, 2, 1_048_576)
        check_range("seed", self.seed, 0, SEED_MAX)
        check_range("workers", self.workers, 0, 4_096, why="0 = run in this process")


@dataclass(kw_only=True)
class Distillation(Checked):
    teacher: str | None = setting(None, "Online teacher (HF model directory, same tokenizer): full logits on each "
                                        "worker.", shown="the top-k stored in the trajectories")
    method: Literal["sad", "token_kd", "flat_kd", "sft"] = setting(
        "sad", "sad (λ_r·KD on thoughts + λ_a·KD on actions), token_kd (one KD on both), flat_kd (one KD on every "
               "token after the prompt, observations too: --teacher, or trajectories rolled out with "
               "--context-topk) or sft (imitation CE).")
    lambda_reason: float = setting(1.0, "SAD weight of the [REASON] (thought) tokens.")
    lambda_act: float = setting(1.0, "SAD weight of the [ACT] (action) tokens.")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = setting("forward_kl", "forward_kl, reverse_kl or jsd.")
    beta: float = setting(0.5, "Generalised JSD mixing weight (jsd only).")
    temperature: float = setting(1.0, "Distillation temperature τ (loss × τ²).")
    ce_weight: float = setting(0.0, "Extra cross-entropy on the teacher's tokens (sad, token_kd).")
    loss_chunk_size: int = setting(512, "Sequence positions per chunk of the loss (memory vs speed).")

    def check(self) -> None:
        from raysad.losses import METHODS

        if self.method not in METHODS:
            raise ValueError(f"field 'method': must be one of {', '.join(METHODS)}, got {self.method!r}")
        # lambdas >= 0; both 0 is allowed on purpose: tune_configs/loss_weights.yaml sweeps the 4x4 grid
        # including (0, 0), the heat map's no-distillation corner
        check_range("lambda_reason", self.lambda_reason, 0)
        check_range("lambda_act", self.lambda_act, 0)
        check_range("beta", self.beta, 0, 1)
        check_range("temperature", self.temperature, 0, low_inclusive=False)
        check_range("ce_weight", self.ce_weight, 0)
        check_range("loss_chunk_size", self.loss_chunk_size, 1, 1_048_576)


@dataclass(kw_only=True)
class Workers(Checked):
    precision: Literal["auto", "bf16", "fp32"] = setting("auto", "auto: bf16 autocast on GPU, fp32 on CPU.")
    gpus_per_worker: float = setting(0.0, "GPUs per worker (0 = CPU with gloo).")
    cpus_per_worker: float = setting(1.0, "CPUs per worker.")
    worker_resources: dict[str, float] = setting(
        factory=dict, help="Custom resources each worker asks for, k=v[,k=v]: pins workers to a node type, e.g. "
                           "trainer=1 (cluster.yaml).", shown="none")
    strategy: Literal["ddp", "fsdp"] = setting("ddp", "ddp, or fsdp (FSDP2, shards a student too big for one GPU).")

    def check(self) -> None:
        check_range("gpus_per_worker", self.gpus_per_worker, 0, 1_024)
        check_range("cpus_per_worker", self.cpus_per_worker, 0, 100_000)
        if getattr(self, "workers", 1) == 0 and self.strategy == "fsdp":
            raise ValueError("strategy fsdp needs workers >= 1 (workers 0 runs in this process)")
        _check_resources(self, "worker_resources")


@dataclass(kw_only=True)
class Optimizer(Checked):
    lr: float = setting(5e-4, "Peak learning rate (warm-up, then the schedule's decay).")
    min_lr_ratio: float = setting(0.1, "The learning rate decays to lr × this.")
    warmup_steps: int = setting(10, "Steps of linear warm-up.")
    schedule: Literal["cosine", "linear", "constant"] = setting("cosine", "cosine, linear or constant decay.")
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this (0 = no clipping).")

    def check(self) -> None:
        check_range("lr", self.lr, 0, low_inclusive=False)
        check_range("min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("max_grad_norm", self.max_grad_norm, 0, why="0 = no clipping")


# ------------------------------------------------------------------------------------------ stages ----
@dataclass(kw_only=True)
class RolloutConfig(Tasks, Policy, Play, Tracking, RayCluster):
    """`raysad rollout`: a teacher (or the scripted expert) plays episodes and writes trajectories."""
    out: str = setting("trajectories.jsonl", "Output .jsonl or .parquet; rerunning resumes it.")
    only_success: bool = setting(False, "Write successful episodes only.", flag="--only-success/--keep-failures")
    context_topk: bool = setting(
        False, "With --topk: also keep the model's top-k at every token after its first that it did not write "
               "(observations, the format's labels), one forward per episode: flat_kd then distils offline.",
        flag="--context-topk/--no-context-topk")
    # YAML only (on-policy curricula set them per iteration): a second model, the guide, plays some turns; its
    # turns are marked (turn extra "guide") and are context in training, no loss
    guide: str | None = setting(None)        # its HF folder (the same tokenizer as --model)
    guide_turns: int = setting(0)            # the guide plays each episode's first N turns
    guide_share: float = setting(0.0)        # and each later turn with this probability (seeded per task, turn)
    turn_limit: int | None = setting(None)   # end episodes after N turns (truncated), below the env's max_turns

    def check(self) -> None:
        check_range("guide_turns", self.guide_turns, 0, 10_000)
        check_range("guide_share", self.guide_share, 0, 1)
        check_range("turn_limit", self.turn_limit, 1, 10_000, optional=True)
        if (self.guide_turns or self.guide_share) and not self.guide:
            raise ValueError("fields 'guide_turns' / 'guide_share' need 'guide' (the model that plays those turns)")
        if self.context_topk and (not self.topk or self.policy in ENV_SIDE_POLICIES):
            raise ValueError("field 'context_topk': needs a model policy (hf, vllm, openai) and --topk K > 0")
        if self.guide and self.policy in ENV_SIDE_POLICIES:
            raise ValueError(f"field 'guide': --policy {self.policy} plays without a model; a guide needs hf or vllm")


@dataclass(kw_only=True)
class EvalConfig(Tasks, Policy, Play, Tracking, RayCluster):
    """`raysad evaluate`: a policy plays a held-out split; its episodes become metrics."""
    split: str = default_of(Tasks, "split", "test", "train, valid or test (held out).")
    policy: Literal["expert", "random", "hf", "vllm", "openai"] = default_of(Policy, "policy", "hf")
    reference: str | None = setting(None, "Teacher trajectories (.jsonl/.parquet): CoT match rate of the policy "
                                          "on their prefixes, and (hf models) its cross-entropy on their thought "
                                          "and action tokens.")
    cot_match: bool = setting(True, "With --reference: play the next turn at every reference prefix (CoT match); "
                                    "off keeps only the cross-entropy, which generates nothing.",
                              flag="--cot-match/--no-cot-match")
    out: str = setting("runs/eval", "Directory for trajectories.jsonl and eval.json; rerunning resumes it.")
    method: str | None = setting(None, "What the student is, for the report (sad, token_kd, sft, teacher).",
                                 shown="<model>/raysad.json, or the policy for expert/random")
    student_size: str | None = setting(None, "The student's size name, for the report.",
                                       shown="<model>/raysad.json")


@dataclass(kw_only=True)
class DistillConfig(Distillation, Training, Workers, Optimizer, Tracking, RayCluster):
    """`raysad distill`: a student trained on teacher trajectories on Ray Train."""
    trajectories: str = setting(help="Teacher trajectories (.jsonl or .parquet) from `raysad rollout`.")
    student: str = setting(help="Student: HF model directory, a tiny size name (tiny-1m, tiny-5m, tiny-20m), or "
                                "derive:keep_every=K | derive:first=A,last=B [,width_factor=F] (cut from --teacher "
                                "into <out>/derived-student: every K-th layer, or its first A and last B layers).")
    curriculum: bool = setting(False, "Easy -> hard: train on the easiest share of the trajectories (by thought + "
                                      "action tokens and teacher entropy), unlocking more each epoch.")
    curriculum_start: float = setting(0.3, "Share of the (sorted) data unlocked in the first epoch.")
    curriculum_pace: float = setting(0.5, "Share of the run (its steps, or epochs) over which the unlocked share "
                                          "grows to all of the data; the rest trains on all of it.")
    checkpoint_every: int = setting(50, "Steps between checkpoints (one is also written at the end).")
    resume: bool = setting(True, "Continue from the last checkpoint of the run in --out, or start again.")
    max_failures: int = setting(2, "Worker failures Ray Train recovers from (from the last checkpoint).")
    log_every: int = setting(10, "A progress line every this many steps.")
    log_model_weights: bool = setting(False, "Upload the weights as MLflow artifacts too (small files always).")
    storage: str | None = setting(None, "Ray Train storage for checkpoints.", shown="<out>/checkpoints")
    # set by the driver and by other stages, not by users
    trajectories_sha256: str | None = setting(None)   # the content a run trained on: a resume over other content
    #                                                   under the same path is refused
    stage: str = setting("distill")                    # MLflow `stage` tag (`raysad sft` runs this as "sft")
    fail_once_at_step: int = setting(0)                # test hook: the last rank raises once after this many steps
    #                                    (before that step's log line and checkpoint; <out>/.injected_failure
    #                                    records it so the replacement worker goes on); 0 = never

    def check(self) -> None:
        check_range("curriculum_start", self.curriculum_start, 0, 1, low_inclusive=False)
        check_range("curriculum_pace", self.curriculum_pace, 0, 1)
        check_range("checkpoint_every", self.checkpoint_every, 1)
        check_range("max_failures", self.max_failures, 0, 1_000)
        check_range("log_every", self.log_every, 1)
        check_range("fail_once_at_step", self.fail_once_at_step, 0, why="0 = never")


@dataclass(kw_only=True)
class SFTConfig(Training, Optimizer, Tracking, RayCluster):
    """`raysad sft`: a teacher fine-tuned on expert trajectories (the distill trainer, method sft)."""
    RENAMED: ClassVar[dict[str, str]] = {"grad_clip": "max_grad_norm"}
    trajectories: str = setting(help="Expert trajectories (.jsonl or .parquet), e.g. from `raysad rollout "
                                     "--policy expert`.")
    model: str = setting("tiny-5m", "HF model directory to fine-tune, or a tiny size name (tiny-1m, tiny-5m, "
                                    "tiny-20m).")
    tokenizer: str | None = default_of(Training, "tokenizer", None, "Tokenizer directory.",
                                           shown="the model's; for a size name, one trained on the trajectories")
    out: str = default_of(Training, "out", "runs/teacher")
    epochs: int = default_of(Training, "epochs", 3)
    micro_batch_size: int = default_of(Training, "micro_batch_size", 8)
    lr: float = default_of(Optimizer, "lr", 1e-3)
    workers: int = default_of(Training, "workers", 0)
    run_name: str | None = default_of(Tracking, "run_name", "sft")
    vocab_size: int = setting(4096, "Vocabulary of the tokenizer trained here (tiny size names without "
                                    "--tokenizer).")
    device: str | None = setting(None, "cpu or cuda (one GPU per worker; choose GPUs with CUDA_VISIBLE_DEVICES).",
                                 shown="cuda if available")
    precision: Literal["auto", "bf16", "fp32"] = default_of(Workers, "precision", "auto")

    def check(self) -> None:
        # vocab_size: 256 bytes + EOS + PAD at least; at most 1_048_576 (the embedding would exhaust memory)
        check_range("vocab_size", self.vocab_size, 258, 1_048_576)


@dataclass(kw_only=True)
class OnPolicyConfig(Distillation, Training, Workers, Tasks, Play, Optimizer, Tracking, RayCluster):
    """`raysad onpolicy`: iterations in which the student plays, the teacher scores the student's own tokens
    and the student learns from them segment by segment."""
    student: str = setting(help="The student to train: HF model directory, or derive:keep_every=K | "
                                "derive:first=A,last=B (cut from --teacher into <out>/derived-student).")
    teacher: str = setting(help="The teacher (HF model directory, the student's tokenizer): its full distribution "
                                "at every token the student wrote.")
    method: Literal["sad", "token_kd", "flat_kd", "sft"] = default_of(
        Distillation, "method", "sad", "sad (λ_r·D on the student's thoughts + λ_a·D on its actions), token_kd (one "
                                       "D over both: vanilla on-policy distillation) or flat_kd (observations too).")
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = default_of(Distillation, "divergence", "reverse_kl")
    tokenizer: str | None = setting(None)  # the student's own (a folder, or cut from the teacher with its tokenizer)
    iterations: int = setting(4, "Iterations of play -> score + train.")
    max_staleness: int = setting(0, "0: each iteration plays with the weights it then trains (synchronous); 1: "
                                    "the next iteration's episodes are played while this one trains, by the "
                                    "weights one iteration older.")
    engine: Literal["hf", "vllm"] = setting("hf", "The student's engine when it plays: hf or vllm.")
    sample_temperature: float = setting(1.0, "The student's sampling temperature when it plays.")
    teacher_trajectories: str | None = setting(None, "Teacher trajectories (.jsonl/.parquet) mixed into every "
                                                     "iteration's data: off-policy examples (GKD's λ).")
    teacher_share: float = setting(0.0, "Share of each iteration's trajectories taken from --teacher-trajectories "
                                        "(0 = purely on-policy).")
    out: str = default_of(Training, "out", "runs/onpolicy", "Directory: a folder per iteration (its trajectories "
                                                            "and student); the last student is <out>/student.")
    episodes: int | None = default_of(Tasks, "episodes", 16, "Episodes the student plays per iteration (the "
                                                             "split's tasks in turn).")
    max_steps: int = default_of(Training, "max_steps", 8, "Optimizer steps per iteration (0 = one pass over its "
                                                          "trajectories).")
    schedule: Literal["cosine", "linear", "constant"] = default_of(
        Optimizer, "schedule", "constant", "cosine, linear or constant decay within each iteration (warm-up in "
                                           "the first only).")
    workers: int = default_of(Training, "workers", 0)
    teacher_topk: int = setting(0, "0: the teacher scores online inside training (its full distribution, on every "
                                   "Train worker); K: the teacher's engine actors score the student's tokens "
                                   "first (flat_kd: every token after the first the student wrote), their top-K "
                                   "rows are stored in the iteration's trajectories and training reads them (no "
                                   "teacher in the Train workers).")
    depth_curriculum: Literal["off", "b2f", "f2b"] = setting(
        "off", "TCOD's curriculum over trajectory depth, reaching full depth linearly over --curriculum-iterations: "
               "b2f (the teacher plays each episode's first turns, the student the rest; the teacher's part shrinks "
               "to none; it starts from the teacher's median episode length in --teacher-trajectories if given) or "
               "f2b (the student plays the first turns only, episodes end there; the depth grows to --max-turns). "
               "The teacher's turns are context, no loss.")
    teacher_takeover: float = setting(0.0, "Share of the student's turns that the teacher plays instead at the first "
                                           "iteration, decaying linearly to 0 over --curriculum-iterations (guided "
                                           "on-policy); the teacher's turns are context, no loss.")
    curriculum_iterations: int | None = setting(None, "Iterations over which the depth curriculum reaches full "
                                                      "depth and the take-over share decays to 0.",
                                                shown="--iterations")

    def check(self) -> None:
        if self.method == "sft":
            raise ValueError("field 'method': sft learns from the teacher's tokens, not the student's; on-policy "
                             "distillation uses sad, token_kd or flat_kd")
        if self.teacher_share and not self.teacher_trajectories:
            raise ValueError("field 'teacher_share' needs --teacher-trajectories (the off-policy examples to mix in)")
        check_range("iterations", self.iterations, 1, 100_000)
        check_range("max_staleness", self.max_staleness, 0, 1, why="0 = synchronous, 1 = play ahead")
        check_range("sample_temperature", self.sample_temperature, 0, why="0 = greedy")
        check_range("teacher_share", self.teacher_share, 0, 1, high_inclusive=False)
        check_range("teacher_takeover", self.teacher_takeover, 0, 1)
        check_range("teacher_topk", self.teacher_topk, 0, 1_000, why="0 = the teacher online in training")
        check_range("curriculum_iterations", self.curriculum_iterations, 1, 100_000, optional=True)


@dataclass(kw_only=True)
class PruneConfig(Tracking):
    """`raysad prune`: structured pruning of MLP channels and attention heads by a ratio."""
    model: str = setting(help="HF model directory (model + tokenizer) to prune, e.g. a distilled student.")
    out: str = setting("runs/pruned", "Directory for the pruned model + tokenizer.")
    ratio: float = setting(0.25, "Fraction of MLP channels and of attention heads to remove, same in every layer.")
    importance: Literal["magnitude", "taylor"] = setting(
        "magnitude", "magnitude (weights only) or taylor (|w·grad| on calibration trajectories).")
    trajectories: str | None = setting(None, "Trajectories for calibration (taylor, perplexity) and recovery.")
    calibration_batches: int = setting(4, "Batches of trajectories for taylor gradients and perplexity.")
    batch_size: int = setting(4, "Trajectories per calibration batch (and recovery step).")
    max_length: int = setting(512, "Tokens per trajectory: longer ones lose prompt tokens from the left first, "
                                   "then whole turns from the end.")
    prune_heads: bool = setting(True, "Remove attention heads (GQA-aware).", flag="--prune-heads/--keep-heads")
    prune_mlp: bool = setting(True, "Remove MLP channels.", flag="--prune-mlp/--keep-mlp")
    round_to: int = setting(8, "Keep MLP channel counts a multiple of this where possible (1 = off).")
    recover_steps: int = setting(0, "Distil the pruned model from the unpruned one for N steps afterwards "
                                    "(0 = no).")
    recover_method: Literal["sad", "token_kd", "sft"] = setting("sad", "The recovery's distillation method.")
    recover_lr: float = setting(2e-4, "The recovery's peak learning rate.")
    recover_workers: int = setting(0, "Ray Train workers of the recovery (0 = in this process; >= 1 in Tune).")
    seed: int = setting(0, "Seed for the calibration draw.")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ...", shown="cuda if available")
    dtype: str = setting("auto", "Weights dtype of the result: auto (as saved), float32, bfloat16 ...")
    run_name: str | None = default_of(Tracking, "run_name", "prune")

    def check(self) -> None:
        # ratio 0 is allowed: nothing removed, the unpruned baseline (tune's prune_ratio 0.0)
        check_range("ratio", self.ratio, 0, 1, high_inclusive=False, why="the fraction of channels and heads removed")
        check_range("calibration_batches", self.calibration_batches, 1, 1_000_000)
        check_range("batch_size", self.batch_size, 1, 65_536)
        check_range("max_length", self.max_length, 2, 1_048_576)
        check_range("round_to", self.round_to, 1, 65_536, why="1 = no rounding")
        check_range("recover_steps", self.recover_steps, 0, why="0 = no recovery")
        check_range("recover_lr", self.recover_lr, 0, low_inclusive=False)
        check_range("recover_workers", self.recover_workers, 0, 4_096, why="0 = in this process")
        check_range("seed", self.seed, 0, SEED_MAX)


@dataclass(kw_only=True)
class ReportConfig(Checked):
    """`raysad report`: the evaluated runs of an experiment as a table and plots, from MLflow."""
    experiment: str = setting("raysad", "MLflow experiment to compare.")
    group_by: list[str] = setting(factory=list, help="Comma-separated columns (method,student_size): one row per "
                                                     "group, mean ± std over the rest (seeds).")
    sort_by: str = setting("eval/success_rate", "Metric or param to sort by.")
    ascending: bool = setting(False, "Sort order.", flag="--ascending/--descending")
    filter: str | None = setting(None, "MLflow search filter, e.g. \"tags.sweep = 'x'\" or \"params.env = 'webshop'\".")
    out: str | None = setting(None, "Also write the table (all eval/ metrics, raw numbers) to a .csv or .json file.")
    plots: str | None = setting(None, "Directory for PNG plots: Pareto front, lambda heat map, training curves.")
    log: bool = setting(True, "Log the table and plots as artifacts of a `report` run.")
    tracking_uri: str | None = default_of(Tracking, "tracking_uri", None)
