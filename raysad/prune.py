"""Structured pruning of a student by a ratio (`raysad prune`): fewer MLP channels and attention heads.

    from raysad.prune import PruneConfig, run_prune
    run_prune(PruneConfig(model="runs/student", out="runs/pruned", ratio=0.25))

What is removed, per decoder layer of a Llama-style model (Llama, Qwen2, Mistral, SmolLM ...):
  * MLP channels: rows of gate_proj/up_proj and the matching columns of down_proj;
  * attention heads, GQA-aware: whole key/value groups (a k/v head and the query heads that read it) and
    query heads inside the kept groups, so every kept k/v head keeps the same number of query heads.
`ratio` is the fraction of MLP channels and of query heads removed (embeddings and norms stay, so the
fraction of parameters removed is smaller; the result reports it). head_dim and hidden_size stay.

Pruning is *uniform*: every layer keeps the same number of channels and heads (which ones is chosen per
layer by importance). A Llama/Qwen2 config has one intermediate_size and one head count for all layers, so
only uniform shapes save as an ordinary HF directory that AutoModelForCausalLM (and vLLM) reload.

Importance: `magnitude` (sum of squared weights of everything a channel/head owns) or `taylor`
(|weight · gradient| summed, first-order Taylor estimate of the loss change, with gradients of the
cross-entropy on [REASON] ∪ [ACT] tokens of a few calibration batches of trajectories).

Who does what: torch-pruning traces the model once and gives the MLP its dependency group (gate/up out
channels coupled with down in channels through SiLU and the product): its GroupMagnitudeImportance /
GroupTaylorImportance score the group and group.prune() slices it. Its grouping of attention through the
GQA reshape/repeat_kv is not usable (building the q_proj group ran for minutes and would not keep q heads
with their k/v heads), so heads are scored and sliced here, with torch-pruning's Linear slicing functions.

Optional recovery: `recover_steps > 0` distils the pruned model from the unpruned one (online teacher,
full logits) for that many steps with raysad.distill.run_distill: in this process with recover_workers=0, on
Ray Train with recover_workers >= 1 (what Tune trials must use: Ray Train refuses in-process mode inside Tune).
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any

from raysad.configs import PruneConfig


def check_config(config: PruneConfig) -> None:
    """Clear errors before any model is loaded."""
    if not 0 <= config.ratio < 1:
        raise ValueError(f"--ratio {config.ratio}: must be in [0, 1) (the fraction of channels and heads removed)")
    if not (Path(config.model) / "config.json").is_file():
        raise ValueError(f"--model {config.model}: not a model directory (no config.json)")
    needs_data = [why for why, on in (("--importance taylor", config.importance == "taylor"),
                                      ("--recover-steps", config.recover_steps > 0)) if on]
    if needs_data and not config.trajectories:
        raise ValueError(f"{' and '.join(needs_data)} need(s) --trajectories (calibration / recovery data)")
    if config.trajectories and not Path(config.trajectories).is_file():
        raise ValueError(f"--trajectories {config.trajectories}: file not found")
    for name in ("calibration_batches", "batch_size", "max_length", "round_to"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if Path(config.out).resolve() == Path(config.model).resolve():
        raise ValueError(f"--out {config.out}: same as --model; write the pruned model elsewhere")


# ------------------------------------------------------------------------------------------- shapes ----
def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def kept_sizes(model_config, ratio: float, round_to: int = 8, prune_heads: bool = True,
               prune_mlp: bool = True) -> dict[str, int]:
    """How many MLP channels, query heads and key/value heads every layer keeps at this ratio.

    MLP: (1 - ratio)·intermediate_size rounded to a multiple of `round_to` (when that leaves at least one
    multiple). Heads: k/v heads are cut by the ratio first, then query heads per kept k/v group so that
    the total comes closest to (1 - ratio)·num_attention_heads (e.g. 4 heads / 2 kv at 0.5 -> 2 / 1).
    """
    width = model_config.intermediate_size
    heads = model_config.num_attention_heads
    kv = getattr(model_config, "num_key_value_heads", None) or heads
    keep_mlp, keep_heads, keep_kv = width, heads, kv
    if prune_mlp and ratio > 0:
        target = width * (1 - ratio)
        keep_mlp = _round_half_up(target / round_to) * round_to if target >= round_to else _round_half_up(target)
        keep_mlp = min(width, max(1, keep_mlp))
    if prune_heads and ratio > 0:
        per_group = heads // kv
        keep_kv = max(1, _round_half_up(kv * (1 - ratio)))
        keep_per_group = min(per_group, max(1, _round_half_up(heads * (1 - ratio) / keep_kv)))
        keep_heads = keep_kv * keep_per_group
    return {"intermediate_size": keep_mlp, "num_attention_heads": keep_heads, "num_key_value_heads": keep_kv}


def _layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    first = layers[0] if layers is not None and len(layers) else None
    if first is None or not all(hasattr(first, m) for m in ("mlp", "self_attn")) or not all(
            hasattr(first.mlp, p) for p in ("gate_proj", "up_proj", "down_proj")) or not all(
            hasattr(first.self_attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
        raise ValueError(f"{type(model).__name__}: prune supports Llama-style models (model.model.layers with "
                         "gate/up/down MLPs and q/k/v/o attention: Llama, Qwen2, Mistral, SmolLM ...)")
    return layers


def _head_dim(model) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


# -------------------------------------------------------------------------------------- importance ----
def calibration_batches(config: PruneConfig, tokenizer) -> list[dict]:
    """Up to `calibration_batches` right-padded batches of trajectories (a seeded draw), as distill sees them."""
    from types import SimpleNamespace

    from raysad.data import collate, load_examples

    # every reason/act token counts here (the loss masks of imitation): calibration has no teacher signal
    examples = load_examples(SimpleNamespace(trajectories=config.trajectories, max_length=config.max_length,
                                             method="sft"), tokenizer)
    random.Random(config.seed).shuffle(examples)
    examples = examples[:config.calibration_batches * config.batch_size]
    return [collate(examples[i:i + config.batch_size], tokenizer.pad_token_id)
            for i in range(0, len(examples), config.batch_size)]


def _batch_loss(model, batch: dict, reduce_sum: bool = False):
    """Cross-entropy on the reason ∪ act tokens of a batch (mean, or sum for perplexity)."""
    from raysad.losses import ce_loss

    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
    mask = (batch["reason_mask"] | batch["act_mask"]).to(device)
    return ce_loss(logits.float(), batch["labels"].to(device), mask, normalizer=1.0 if reduce_sum else None)


def perplexity(model, batches: list[dict]) -> float | None:
    """exp(mean CE) over the reason ∪ act tokens of the batches (None without batches)."""
    import torch

    if not batches:
        return None
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += float(_batch_loss(model, batch, reduce_sum=True))
            count += int((batch["reason_mask"] | batch["act_mask"]).sum())
    return math.exp(total / max(count, 1))


def accumulate_gradients(model, batches: list[dict], progress: bool = False) -> None:
    """Sum of the CE gradients over the calibration batches, left in each parameter's .grad (for taylor)."""
    import torch
    from rich.progress import track

    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for batch in track(batches, description="prune: taylor gradients", disable=not progress):
            _batch_loss(model, batch).backward()


def _element_scores(weight, importance: str):
    """Per-weight importance: w² (magnitude) or |w·∂L/∂w| (taylor), in float32."""
    w = weight.detach().float()
    if importance == "magnitude":
        return w * w
    if weight.grad is None:
        raise RuntimeError("taylor importance needs gradients: run accumulate_gradients first")
    return (w * weight.grad.float()).abs()


def head_scores(attn, num_heads: int, num_kv: int, head_dim: int, importance: str):
    """(query-head scores [H], key/value-head scores [KV]) of one attention block: each head's q rows and
    o_proj columns; each k/v head's k and v rows."""
    q = _element_scores(attn.q_proj.weight, importance).view(num_heads, head_dim, -1).sum((1, 2))
    o = _element_scores(attn.o_proj.weight, importance).view(-1, num_heads, head_dim).sum((0, 2))
    k = _element_scores(attn.k_proj.weight, importance).view(num_kv, head_dim, -1).sum((1, 2))
    v = _element_scores(attn.v_proj.weight, importance).view(num_kv, head_dim, -1).sum((1, 2))
    return q + o, k + v


def choose_heads(q_scores, kv_scores, keep_kv: int, keep_per_group: int) -> tuple[list[int], list[int]]:
    """Kept (query heads, k/v heads), ascending: the k/v groups with the largest total score (its k/v head
    plus its query heads), then the best query heads inside each kept group."""
    import torch

    num_kv = len(kv_scores)
    per_group = len(q_scores) // num_kv
    group_scores = kv_scores + q_scores.view(num_kv, per_group).sum(1)
    kept_kv = sorted(torch.topk(group_scores, keep_kv).indices.tolist())
    kept_q = []
    for j in kept_kv:
        inside = torch.topk(q_scores[j * per_group:(j + 1) * per_group], keep_per_group).indices
        kept_q += sorted((j * per_group + inside).tolist())
    return kept_q, kept_kv


def _mlp_importance(importance: str):
    import torch_pruning as tp

    if importance == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if importance == "taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown importance {importance!r}; use magnitude or taylor")


def _dependency_graph(model):
    """torch-pruning's traced graph of the model (one forward with grad on a few tokens)."""
    import torch
    import torch_pruning as tp

    device = next(model.parameters()).device
    example = torch.arange(min(8, model.config.vocab_size), device=device)[None]
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")  # "unwrapped parameters" (RMSNorm weights): hidden size is not pruned
        return tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                                     forward_fn=lambda m, x: m(x).logits)


# ------------------------------------------------------------------------------------------ pruning ----
def _channels(units: list[int], size: int) -> list[int]:
    return [u * size + i for u in units for i in range(size)]


def prune_model(model, ratio: float, importance: str = "magnitude", batches: list[dict] | None = None,
                prune_heads: bool = True, prune_mlp: bool = True, round_to: int = 8,
                progress: bool = False) -> list[dict]:
    """Prune `model` in place (uniformly across layers) and update its config; returns the plan: per layer
    the kept `mlp` channels, query `heads` and `kv_heads` (original indices, ascending).

    taylor importance needs `batches` (from calibration_batches); their gradients are cleared afterwards.
    """
    import torch
    import torch_pruning as tp

    layers = _layers(model)
    config = model.config
    sizes = kept_sizes(config, ratio, round_to, prune_heads, prune_mlp)
    width, heads = config.intermediate_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = _head_dim(model)
    if importance == "taylor":
        if not batches:
            raise ValueError("taylor importance needs calibration batches (give --trajectories)")
        accumulate_gradients(model, batches, progress)

    # score everything first: slicing drops the gradients that taylor reads
    plan = []
    mlp_scorer = _mlp_importance(importance)
    graph = _dependency_graph(model) if sizes["intermediate_size"] < width else None
    for layer in layers:
        entry = {"mlp": list(range(width)), "heads": list(range(heads)), "kv_heads": list(range(kv))}
        if graph is not None:
            group = graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(width)))
            scores = mlp_scorer(group).float()
            entry["mlp"] = sorted(torch.topk(scores, sizes["intermediate_size"]).indices.tolist())
        if sizes["num_attention_heads"] < heads or sizes["num_key_value_heads"] < kv:
            q_scores, kv_scores = head_scores(layer.self_attn, heads, kv, head_dim, importance)
            entry["heads"], entry["kv_heads"] = choose_heads(
                q_scores, kv_scores, sizes["num_key_value_heads"],
                sizes["num_attention_heads"] // sizes["num_key_value_heads"])
        plan.append(entry)
    model.zero_grad(set_to_none=True)

    for layer, entry in zip(layers, plan):
        dropped = sorted(set(range(width)) - set(entry["mlp"]))
        if dropped:  # gate/up rows and down columns together, as torch-pruning's group couples them
            graph.get_pruning_group(layer.mlp.gate_proj, tp.prune_linear_out_channels, idxs=dropped).prune()
        attn = layer.self_attn
        dropped_q = sorted(set(range(heads * head_dim)) - set(_channels(entry["heads"], head_dim)))
        dropped_kv = sorted(set(range(kv * head_dim)) - set(_channels(entry["kv_heads"], head_dim)))
        if dropped_q:
            tp.prune_linear_out_channels(attn.q_proj, dropped_q)
            tp.prune_linear_in_channels(attn.o_proj, dropped_q)
        if dropped_kv:
            tp.prune_linear_out_channels(attn.k_proj, dropped_kv)
            tp.prune_linear_out_channels(attn.v_proj, dropped_kv)
    del graph

    # the config (shared by every module) and the attributes modules cached from it at construction
    config.intermediate_size = sizes["intermediate_size"]
    config.num_attention_heads = sizes["num_attention_heads"]
    config.num_key_value_heads = sizes["num_key_value_heads"]
    config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    for layer in layers:
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = sizes["intermediate_size"]
        attn = layer.self_attn
        attn.num_key_value_groups = sizes["num_attention_heads"] // sizes["num_key_value_heads"]
        for name, value in (("num_heads", sizes["num_attention_heads"]),
                            ("num_key_value_heads", sizes["num_key_value_heads"])):
            if hasattr(attn, name):
                setattr(attn, name, value)
    return plan


# -------------------------------------------------------------------------------------------- stage ----
def run_prune(config: PruneConfig, track: bool = True, progress: bool = True) -> dict[str, Any]:
    """Load, prune, save model + tokenizer to config.out (then optionally recover by distillation).
    Returns params before/after, the fraction removed, the kept sizes, perplexities and the out path."""
    check_config(config)
    if not track:
        return _prune(config, progress, log=None)
    from raysad import tracking
    from raysad.config import flatten

    with tracking.start_run(config.experiment, config.run_name, flatten(config), uri=config.tracking_uri,
                            tags={"stage": "prune", "importance": config.importance}):
        return _prune(config, progress, log=tracking.log_metrics)


def _prune(config: PruneConfig, progress: bool, log) -> dict[str, Any]:
    """The stage's body; `log` is MLflow's metric logger, or None without tracking."""
    import torch

    from raysad import models

    started = time.perf_counter()
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    say = _say if progress else (lambda text: None)
    device = config.device or models.default_device()
    model = models.load_model(config.model, dtype=config.dtype, device=device)
    tokenizer = models.load_tokenizer(config.model)
    batches = calibration_batches(config, tokenizer) if config.trajectories else []
    before = models.parameter_count(model)
    shapes_before = _shape(model.config)
    ppl_before = perplexity(model, batches)
    say(f"prune: {config.model}: {before:,} parameters, {shapes_before}"
        + (f", calibration perplexity {ppl_before:.3f}" if ppl_before else ""))

    plan = prune_model(model, config.ratio, config.importance, batches, config.prune_heads, config.prune_mlp,
                       config.round_to, progress)
    after = models.parameter_count(model)
    ppl_after = perplexity(model, batches)
    out = Path(config.out)
    model.eval().save_pretrained(out)
    models.save_tokenizer(tokenizer, out)
    result = {"out": str(out), "params_before": before, "params_after": after,
              "fraction_removed": 1 - after / before, "ratio": config.ratio, "importance": config.importance,
              "shape_before": shapes_before, "shape_after": _shape(model.config),
              "ppl_before": ppl_before, "ppl_after": ppl_after}
    del model, plan
    say(f"prune: {after:,} parameters ({result['fraction_removed']:.1%} fewer), {result['shape_after']}"
        + (f", calibration perplexity {ppl_after:.3f}" if ppl_after else ""))

    if config.recover_steps > 0:
        result.update(recover(config, out, track=log is not None))
    result["seconds"] = time.perf_counter() - started
    (out / "prune_summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (log or (lambda metrics: None))({f"prune/{k}": v for k, v in result.items() if k in (
        "params_before", "params_after", "fraction_removed", "ratio", "ppl_before", "ppl_after",
        "ppl_recovered", "seconds")})
    return result


def recover(config: PruneConfig, out: Path, track: bool = True) -> dict[str, Any]:
    """Short distillation of the pruned model (in `out`) from the unpruned one (config.model), written
    back to `out`; the pruned-only model stays in `out/pruned`."""
    import shutil

    try:
        from raysad.distill import DistillConfig, run_distill
    except ImportError as err:  # pragma: no cover - the distill stage ships with raysad
        raise RuntimeError(f"--recover-steps needs raysad.distill.run_distill: {err}") from None
    from raysad import models

    pruned = out / "pruned"
    if pruned.exists():
        shutil.rmtree(pruned)
    pruned.mkdir(parents=True)
    for item in out.iterdir():
        if item.is_file():
            shutil.copy2(item, pruned / item.name)
    distill = DistillConfig(trajectories=str(config.trajectories), student=str(pruned), teacher=config.model,
                            out=str(out), method=config.recover_method, max_steps=config.recover_steps,
                            checkpoint_every=config.recover_steps, batch_size=config.batch_size,
                            micro_batch_size=config.batch_size, lr=config.recover_lr,
                            warmup_steps=min(10, max(1, config.recover_steps // 5)), max_length=config.max_length,
                            seed=config.seed, workers=config.recover_workers, resume=False,
                            experiment=config.experiment,
                            run_name=f"{config.run_name}-recover", tracking_uri=config.tracking_uri)
    distilled = run_distill(distill, track=track)
    model = models.load_model(out, dtype=config.dtype, device=config.device or models.default_device())
    batches = calibration_batches(config, models.load_tokenizer(out))
    return {"recover_steps": distilled.steps, "ppl_recovered": perplexity(model, batches),
            "pruned_only": str(pruned)}


def _shape(config) -> dict[str, int]:
    return {"intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            "num_hidden_layers": config.num_hidden_layers}


def _say(text: str) -> None:
    from raysad import ui

    ui.console(stderr=True).print(text, highlight=False)


def main(config_path: str | Path | None = None, **flags: Any) -> dict[str, Any]:
    """`raysad prune`: build the config (defaults < YAML < flags), prune, print the figures."""
    from raysad import ui

    from raysad.config import build_config

    config = build_config(PruneConfig, config_path, **flags)
    result = run_prune(config)
    ui.console().print(f"[green]prune[/green]: {result['params_before']:,} -> {result['params_after']:,} parameters "
                    f"({result['fraction_removed']:.1%} fewer); model and tokenizer saved to "
                    f"[bold]{result['out']}[/bold]")
    return result
