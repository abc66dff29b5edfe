"""Distillation losses, pure torch: token-level KD, SAD segment KD ([REASON]/[ACT]) and CE (imitation).

Conventions
- Every tensor is already aligned: ``student[b, t]`` is the distribution that predicts ``labels[b, t]``, the
  teacher is aligned the same way and masks are ``[B, T]`` bool. The distill stage does the shift.
- Student: logits ``[B, T, V]``, or ``HiddenStates(hidden [B, T, H], lm_head [V, H])``. With hidden states
  the logits are never materialised for the whole sequence: they are computed chunk by chunk, and the
  gradients for hidden and lm_head are computed in the same pass (as Liger's fused linear + loss), so peak
  memory holds one chunk of ``[chunk, V]`` intermediates plus a ``[V, H]`` gradient.
- Teacher: full logits ``[B, T, V]``, ``HiddenStates`` (logits computed per chunk, no grad), or
  ``TopK(ids, logprobs)`` with ``[B, T, k]`` ids and log-probabilities (over the full vocab, at τ=1).
- Only masked tokens are computed; everything goes through one per-chunk function built on `divergence`,
  whatever the student or teacher form (so plain and chunked paths share all the maths), run chunk by chunk
  by raysad.chunked_loss.

Divergences (per token, over the vocabulary or the k+1 top-k buckets), with P = teacher, Q = student:
- ``forward_kl``: KL(P‖Q) (default; mass-covering, classic KD).
- ``reverse_kl``: KL(Q‖P) (mode-seeking).
- ``jsd``: generalised JSD as in GKD (Agarwal et al. 2024) and TRL's ``generalized_jsd_loss``:
  M = β·P + (1-β)·Q, JSD_β = β·KL(P‖M) + (1-β)·KL(Q‖M); β=0.5 is the symmetric JSD. Following TRL,
  β=0 is taken as forward KL and β=1 as reverse KL (the literal JSD_β vanishes at both ends).
Temperature τ softens both distributions (logits / τ) and the divergence is multiplied by τ², as in Hinton
et al. 2015, so gradient magnitudes stay comparable across τ. CE is always at τ=1.

Top-k teacher (k+1 buckets, the "tail bucket" of verl's ``forward_kl_topk_tail``): the teacher keeps its
k stored log-probs and one tail bucket holding 1 - Σ top-k probabilities; the student is reduced to the same
k tokens plus its own exact tail mass (log-sum-exp over the other V-k logits). The divergence of these two
(k+1)-category distributions is a true divergence (≥ 0, 0 when they agree) and a lower bound of the
full-vocabulary one. When k == V there is no tail and the result equals the full-logits loss.
- Temperature with top-k: the teacher's tempered distribution over the full vocabulary cannot be rebuilt
  from k log-probs (its normaliser needs the tail's individual tokens). We apply τ at the bucket level, to
  both sides alike: the (k+1)-bucket log-probs at τ=1 are divided by τ and re-normalised. At k == V this is
  exactly the full-vocabulary tempered loss; for k < V the tail is tempered as if it were one token.
- Padded slots (a stored log-prob at or below ``TOPK_PAD_THRESHOLD``: rows shorter than k, padded with id 0 and
  encoding.TOPK_PAD_LOGPROB) hold no mass on either side: the student's probability of the pad id stays in its
  tail, so a row with pads gives the same loss as the same row stored without them.
- The teacher tail is floored at ``TAIL_FLOOR`` (1e-6): stored float32 log-probs sum to 1 only up to about
  1e-7, so a smaller tail is rounding noise, and the floor keeps reverse KL / JSD finite when the top-k holds
  (nearly) all the mass.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F

from raysad.chunked_loss import ChunkedLoss, ChunkPlan

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS = ("forward_kl", "reverse_kl", "jsd")

CHUNK_ELEMENTS = 2**23  # default chunk: tokens such that one [chunk, V] float32 tensor is about 32 MiB
TAIL_FLOOR = 1e-6  # smallest teacher tail mass for top-k teachers (see the module docstring)
TOPK_PAD_THRESHOLD = -5e3  # stored top-k log-probs at or below this are padding (encoding pads with -1e4)
_LOGP_FLOOR = -1e4  # -inf log-probs (masked vocab rows) become this: exp() is exactly 0, no inf - inf = nan


class TopK(NamedTuple):
    """Sparse teacher: the k most likely token ids and their log-probabilities (full vocab, τ=1), [B, T, k]."""

    ids: torch.Tensor
    logprobs: torch.Tensor


class HiddenStates(NamedTuple):
    """Final hidden states [B, T, H] and the lm_head weight [V, H]: logits = hidden @ lm_head.T (no bias)."""

    hidden: torch.Tensor
    lm_head: torch.Tensor


class SADLoss(NamedTuple):
    """`total` carries the gradient; the other parts are detached, for logging.

    total = lambda_reason * reason_loss + lambda_act * act_loss + ce_weight * ce_loss, where reason_loss and
    act_loss are the mean divergence over the segment's tokens (0 for a segment without tokens) and ce_loss is
    the mean CE over reason ∪ act tokens (None when no labels were given).
    """

    total: torch.Tensor
    reason_loss: torch.Tensor
    act_loss: torch.Tensor
    ce_loss: torch.Tensor | None
    num_reason_tokens: int
    num_act_tokens: int


# ---------------------------------------------------------------------------------------------------------
# The maths: per-token divergence between a student and a teacher distribution (no chunking, plain autograd)


def divergence(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token divergence, shape ``student_logits.shape[:-1]``, computed in float32.

    ``teacher`` is full logits with the student's shape, or a `TopK` whose tensors share the student's
    leading dims (then the divergence is over the k teacher tokens + one tail bucket; see the module doc).
    Values are multiplied by temperature². Plain autograd over the whole input: use the loss functions
    below for masked, chunked, memory-bounded computation.
    """
    _check_kind(kind, beta, temperature)
    student_logp, teacher_logp = _bucket_logprobs(student_logits, teacher, temperature)
    # -inf (masked vocab rows) would give 0 * inf = nan; the floor keeps exp() at exactly 0 and grads finite
    student_logp = student_logp.clamp(min=_LOGP_FLOOR)
    teacher_logp.clamp_(min=_LOGP_FLOOR)  # a fresh tensor without grad: in place saves a [N, V] copy
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        values = _kl(teacher_logp, student_logp)
    elif kind == "reverse_kl":
        values = _kl(student_logp, teacher_logp)
    else:
        mixture_logp = torch.logaddexp(teacher_logp + math.log(beta), student_logp + math.log1p(-beta))
        values = beta * _kl(teacher_logp, mixture_logp) + (1.0 - beta) * _kl(student_logp, mixture_logp)
    return values * temperature**2


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) over the last dim from log-probs (finite; P's zero entries contribute exactly 0)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _bucket_logprobs(student_logits, teacher, temperature):
    """Student and teacher log-probs over the same support (vocab, or top-k + tail), tempered, float32."""
    student_logits = student_logits.float()
    if not isinstance(teacher, TopK):
        with torch.no_grad():
            teacher_logits = teacher.float()
            teacher_logp = F.log_softmax(teacher_logits if temperature == 1.0 else teacher_logits / temperature, -1)
        if temperature != 1.0:
            student_logits = student_logits / temperature
        return F.log_softmax(student_logits, dim=-1), teacher_logp
    ids, teacher_top = teacher.ids, teacher.logprobs.detach().float()
    real = teacher_top > TOPK_PAD_THRESHOLD  # padded slots: no mass on either side
    lse = torch.logsumexp(student_logits, dim=-1, keepdim=True)
    student_top = (student_logits.gather(-1, ids) - lse).masked_fill(~real, _LOGP_FLOOR)
    teacher_top = teacher_top.masked_fill(~real, _LOGP_FLOOR)
    if ids.shape[-1] < student_logits.shape[-1]:
        # the student's tail exactly: log-sum-exp over the logits outside the teacher's (real) top-k (no 1 - Σ
        # cancellation when the top-k holds almost all the mass); a finite fill, not -inf, so a row whose
        # other logits are all -inf (masked vocab) still has a nan-free backward
        in_top = torch.zeros_like(student_logits, dtype=torch.bool).scatter_add_(
            -1, ids, real) if not bool(real.all()) else None
        others = (student_logits.scatter(-1, ids, torch.finfo(torch.float32).min) if in_top is None
                  else student_logits.masked_fill(in_top, torch.finfo(torch.float32).min))
        student_tail = torch.logsumexp(others, dim=-1, keepdim=True) - lse
        top_mass = teacher_top.double().exp().sum(-1, keepdim=True)  # pads: exp(-1e4) == 0
        teacher_tail = (1.0 - top_mass).clamp(min=TAIL_FLOOR).log().float()
        student_top = torch.cat([student_top, student_tail], dim=-1)
        teacher_top = torch.cat([teacher_top, teacher_tail], dim=-1)
    # temperature on the buckets, both sides alike; at τ=1 this only re-normalises the floored teacher tail
    return (F.log_softmax(student_top / temperature, dim=-1),
            F.log_softmax(teacher_top / temperature, dim=-1))


def _check_kind(kind, beta, temperature):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


# ---------------------------------------------------------------------------------------------------------
# Chunked, masked evaluation: the per-chunk maths, run by raysad.chunked_loss for every student/teacher form


class _ChunkMaths(NamedTuple):
    """The per-token losses of one chunk of student logits: divergence to the teacher and/or CE to the labels."""

    teacher: torch.Tensor | TopK | HiddenStates | None
    labels: torch.Tensor | None
    kind: str
    beta: float
    temperature: float
    with_divergence: bool
    with_ce: bool

    def __call__(self, logits, b, t):
        """(divergence, CE), each [c] or None, for student logits [c, V] at positions (b, t)."""
        div = ce = None
        if self.with_divergence:
            teacher = self.teacher
            if isinstance(teacher, TopK):
                teacher = TopK(teacher.ids[b, t], teacher.logprobs[b, t])
            elif isinstance(teacher, HiddenStates):
                with torch.no_grad():
                    teacher = teacher.hidden[b, t] @ teacher.lm_head.T
            else:
                teacher = teacher[b, t]
            div = divergence(logits, teacher, self.kind, self.beta, self.temperature)
        if self.with_ce:
            labels = self.labels[b, t]
            logits32 = logits.float()
            ce = torch.logsumexp(logits32, dim=-1) - logits32.gather(-1, labels[:, None]).squeeze(-1)
        return div, ce


def _run(student, plan_args: dict, rows: torch.Tensor):
    """Check shapes, then run the chunked pass over the (b, t) positions where ``rows`` is True."""
    if isinstance(student, HiddenStates):
        student_x, lm_head = student.hidden, student.lm_head
        if student_x.dim() != 3 or lm_head.dim() != 2 or student_x.shape[-1] != lm_head.shape[-1]:
            raise ValueError(f"student HiddenStates: hidden must be [B, T, H] and lm_head [V, H], got "
                             f"{tuple(student_x.shape)} and {tuple(lm_head.shape)}")
        vocab = lm_head.shape[0]
    elif isinstance(student, torch.Tensor):
        student_x, lm_head = student, None
        if student_x.dim() != 3:
            raise ValueError(f"student logits must be [B, T, V], got {tuple(student_x.shape)}")
        vocab = student_x.shape[-1]
    else:
        raise TypeError(f"student must be logits [B, T, V] or HiddenStates, got {type(student).__name__}")
    batch_shape = tuple(student_x.shape[:2])
    if tuple(rows.shape) != batch_shape:
        raise ValueError(f"masks must be [B, T] = {list(batch_shape)} like the student, got {list(rows.shape)}")
    _check_teacher(plan_args.get("teacher"), batch_shape, vocab)
    labels = plan_args.get("labels")
    if labels is not None:
        if tuple(labels.shape) != batch_shape:
            raise ValueError(f"labels must be [B, T] = {list(batch_shape)}, got {list(labels.shape)}")
        used = labels[rows]
        if used.numel() and (used.min() < 0 or used.max() >= vocab):
            raise ValueError(f"labels at loss positions must be token ids in [0, {vocab}), "
                             f"got values in [{used.min().item()}, {used.max().item()}]")
    if plan_args["chunk_size"] is None:
        plan_args["chunk_size"] = max(16, CHUNK_ELEMENTS // vocab)
    if plan_args["chunk_size"] < 1:
        raise ValueError(f"chunk_size must be >= 1 (or None for automatic), got {plan_args['chunk_size']}")
    rows_b, rows_t = rows.nonzero(as_tuple=True)
    div_weight, ce_weight = plan_args["div_weight"], plan_args["ce_weight"]
    maths = _ChunkMaths(plan_args["teacher"], plan_args["labels"], plan_args["kind"], plan_args["beta"],
                        plan_args["temperature"], with_divergence=div_weight is not None, with_ce=ce_weight is not None)
    plan = ChunkPlan(rows_b=rows_b, rows_t=rows_t, div_weight=div_weight, ce_weight=ce_weight, chunk_losses=maths,
                     chunk_size=plan_args["chunk_size"], grad_enabled=torch.is_grad_enabled())
    return ChunkedLoss.apply(student_x, lm_head, plan)


def _check_teacher(teacher, batch_shape, vocab):
    if teacher is None:
        return
    if isinstance(teacher, TopK):
        ids, logprobs = teacher
        if ids.dim() != 3 or tuple(ids.shape[:2]) != batch_shape or ids.shape != logprobs.shape:
            raise ValueError(f"teacher TopK: ids and logprobs must both be [B, T, k] with [B, T] = "
                             f"{list(batch_shape)}, got {tuple(ids.shape)} and {tuple(logprobs.shape)}")
        if ids.dtype not in (torch.int64, torch.int32) or ids.shape[-1] > vocab:
            raise ValueError(f"teacher TopK: ids must be integer token ids with k <= V={vocab}, "
                             f"got dtype {ids.dtype}, k={ids.shape[-1]}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
            raise ValueError(f"teacher TopK: ids must be in [0, {vocab}) (student vocab), "
                             f"got values in [{ids.min().item()}, {ids.max().item()}]")
        return
    if isinstance(teacher, HiddenStates):
        hidden, lm_head = teacher
        shape = (*hidden.shape[:-1], lm_head.shape[0]) if hidden.dim() == 3 and lm_head.dim() == 2 else None
        if shape is None or hidden.shape[-1] != lm_head.shape[-1]:
            raise ValueError(f"teacher HiddenStates: hidden must be [B, T, H] and lm_head [V, H], got "
                             f"{tuple(hidden.shape)} and {tuple(lm_head.shape)}")
    elif isinstance(teacher, torch.Tensor):
        shape = tuple(teacher.shape)
    else:
        raise TypeError(f"teacher must be logits [B, T, V], TopK or HiddenStates, got {type(teacher).__name__}")
    if tuple(shape) != (*batch_shape, vocab):
        raise ValueError(f"teacher logits must be [B, T, V] = {[*batch_shape, vocab]} like the student "
                         f"(same tokenizer, same padded vocab), got {list(shape)}")


# ---------------------------------------------------------------------------------------------------------
# Public losses


def token_kd_loss(
    student: torch.Tensor | HiddenStates,
    teacher: torch.Tensor | TopK | HiddenStates,
    mask: torch.Tensor,
    *,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Token-level KD baseline: the divergence averaged over all ``mask`` tokens (reason ∪ act); 0 if none.

    ``normalizer`` replaces the local token count as the divisor (see `sad_loss`)."""
    _check_kind(kind, beta, temperature)
    mask = mask.bool()
    n = int(mask.sum())
    weights = torch.full((n,), 1.0 / (normalizer or max(n, 1)), device=mask.device)
    total, _, _ = _run(student, dict(div_weight=weights, ce_weight=None, teacher=teacher, labels=None, kind=kind,
                                     beta=beta, temperature=temperature, chunk_size=chunk_size), mask)
    return total


def ce_loss(
    student: torch.Tensor | HiddenStates,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    chunk_size: int | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Imitation-learning baseline: mean cross-entropy of the teacher's tokens ``labels`` over ``mask``.

    ``normalizer`` replaces the local token count as the divisor (see `sad_loss`)."""
    mask = mask.bool()
    n = int(mask.sum())
    weights = torch.full((n,), 1.0 / (normalizer or max(n, 1)), device=mask.device)
    total, _, _ = _run(student, dict(div_weight=None, ce_weight=weights, teacher=None, labels=labels,
                                     kind="forward_kl", beta=0.5, temperature=1.0, chunk_size=chunk_size), mask)
    return total


def sad_loss(
    student: torch.Tensor | HiddenStates,
    teacher: torch.Tensor | TopK | HiddenStates,
    reason_mask: torch.Tensor,
    act_mask: torch.Tensor,
    *,
    lambda_reason: float = 1.0,
    lambda_act: float = 1.0,
    kind: Kind = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    reason_normalizer: float | None = None,
    act_normalizer: float | None = None,
    ce_normalizer: float | None = None,
) -> SADLoss:
    """Structured Agent Distillation: λ_r·mean(div over reason tokens) + λ_a·mean(div over act tokens)
    (+ ce_weight·mean CE over reason ∪ act tokens). A segment without tokens contributes 0.

    CE is computed (and reported) whenever ``labels`` is given; it is required when ce_weight > 0.
    The ``*_normalizer`` arguments replace the local token counts as divisors of ``total`` (the reported
    parts stay local means): with micro-batches and data-parallel workers, pass each segment's token count
    over the whole global batch divided by the number of workers, so that the averaged gradients equal
    those of one worker on the whole batch.
    """
    _check_kind(kind, beta, temperature)
    if ce_weight > 0 and labels is None:
        raise ValueError("sad_loss: ce_weight > 0 needs labels (the teacher's tokens, [B, T])")
    reason, act = reason_mask.bool(), act_mask.bool()
    if reason.shape != act.shape:
        raise ValueError(f"reason_mask and act_mask must have the same [B, T] shape, "
                         f"got {list(reason.shape)} and {list(act.shape)}")
    used = reason | act
    n_reason, n_act, n_used = int(reason.sum()), int(act.sum()), int(used.sum())
    is_reason, is_act = reason[used].float(), act[used].float()  # row order of used.nonzero()
    div_weight = (is_reason * (lambda_reason / (reason_normalizer or max(n_reason, 1)))
                  + is_act * (lambda_act / (act_normalizer or max(n_act, 1))))
    ce_weights = None
    if labels is not None:
        ce_weights = torch.full((n_used,), ce_weight / (ce_normalizer or max(n_used, 1)), device=used.device)
    total, div, ce = _run(student, dict(div_weight=div_weight, ce_weight=ce_weights, teacher=teacher, labels=labels,
                                        kind=kind, beta=beta, temperature=temperature, chunk_size=chunk_size), used)
    return SADLoss(
        total=total,
        reason_loss=(div * is_reason).sum() / max(n_reason, 1),
        act_loss=(div * is_act).sum() / max(n_act, 1),
        ce_loss=ce.sum() / max(n_used, 1) if labels is not None else None,
        num_reason_tokens=n_reason,
        num_act_tokens=n_act,
    )


# ---------------------------------------------------------------------------------------------------------
# Methods: a name -> loss registry. A stage looks its method up here; a new method (an on-policy loss, say)
# is one function and one `register_method` call.

class MethodLoss(NamedTuple):
    total: torch.Tensor       # what is backpropagated
    reason_sum: torch.Tensor  # detached sums over the reason / act targets (divergence, or CE for imitation)
    act_sum: torch.Tensor
    ce_sum: torch.Tensor      # detached CE sum over reason ∪ act (the teacher-token NLL, always logged)


class Method(NamedTuple):
    """A distillation method: its loss and what its data needs.

    loss(student, teacher, labels, reason, act, options, norms) -> MethodLoss, with `options` carrying
    lambda_reason, lambda_act, divergence, beta, temperature, ce_weight, loss_chunk_size, and `norms` the
    divisors {"reason", "act", "used"} (global token counts / workers)."""
    loss: Callable[..., MethodLoss]
    uses_teacher: bool   # False: imitation on the trajectory's own tokens; no teacher signal is read
    flat: bool = False   # the act mask spans every target after the prompt (observations included)
    doc: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    METHODS[name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name]


def _segment_kd(student, teacher, labels, reason, act, options, norms, one_divergence: bool) -> MethodLoss:
    """KD on reason and act targets: weighted per segment (SAD), or one divergence over their union."""
    n_reason, n_act = int(reason.sum()), int(act.sum())
    out = sad_loss(student, teacher, reason, act,
                   lambda_reason=1.0 if one_divergence else options.lambda_reason,
                   lambda_act=1.0 if one_divergence else options.lambda_act,
                   kind=options.divergence, beta=options.beta, temperature=options.temperature,
                   ce_weight=options.ce_weight, labels=labels, chunk_size=options.loss_chunk_size,
                   reason_normalizer=norms["used"] if one_divergence else norms["reason"],
                   act_normalizer=norms["used"] if one_divergence else norms["act"],
                   ce_normalizer=norms["used"])
    return MethodLoss(out.total, out.reason_loss.detach() * n_reason, out.act_loss.detach() * n_act,
                      out.ce_loss.detach() * (n_reason + n_act))


def _sad(student, teacher, labels, reason, act, options, norms) -> MethodLoss:
    return _segment_kd(student, teacher, labels, reason, act, options, norms, one_divergence=False)


def _token_kd(student, teacher, labels, reason, act, options, norms) -> MethodLoss:
    return _segment_kd(student, teacher, labels, reason, act, options, norms, one_divergence=True)


def _imitation(student, teacher, labels, reason, act, options, norms) -> MethodLoss:
    # two passes over disjoint masks, so reason and act CE are logged apart; their sum is CE over the union
    parts = [ce_loss(student, labels, mask, chunk_size=options.loss_chunk_size, normalizer=norms["used"])
             for mask in (reason, act)]
    reason_sum, act_sum = (p.detach() * norms["used"] for p in parts)
    return MethodLoss(parts[0] + parts[1], reason_sum, act_sum, reason_sum + act_sum)


register_method("sad", Method(_sad, uses_teacher=True,
                              doc="λ_r·KD over [REASON] tokens + λ_a·KD over [ACT] tokens"))
register_method("token_kd", Method(_token_kd, uses_teacher=True, doc="one KD over reason ∪ act tokens"))
register_method("flat_kd", Method(_token_kd, uses_teacher=True, flat=True,
                                  doc="one KD over every token after the prompt, observations included"))
register_method("sft", Method(_imitation, uses_teacher=False, doc="CE on the teacher's tokens (imitation)"))
