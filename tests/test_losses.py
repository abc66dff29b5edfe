"""raysad.losses: divergences against sums written out by hand, masking, SAD weighting, top-k, chunking."""
import math

import pytest
import torch
import torch.nn.functional as F

from raysad.losses import (
    TAIL_FLOOR,
    HiddenStates,
    TopK,
    ce_loss,
    divergence,
    sad_loss,
    token_kd_loss,
)

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def topk_of(teacher_logits, k):
    logprobs = teacher_logits.log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    return TopK(top.indices, top.values)


# ---- reference written out with math.exp/log over python floats (no torch maths) -----------------------

def softmax_list(xs, temperature=1.0):
    zs = [x / temperature for x in xs]
    top = max(zs)
    es = [math.exp(z - top) for z in zs]
    return [e / sum(es) for e in es]


def temper(ps, temperature):
    ws = [p ** (1.0 / temperature) for p in ps]
    return [w / sum(ws) for w in ws]


def ref_divergence(p, q, kind, beta):
    def kl(a, b):
        return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def ref_full(student_row, teacher_row, kind, beta, temperature):
    p = softmax_list(teacher_row, temperature)
    q = softmax_list(student_row, temperature)
    return temperature ** 2 * ref_divergence(p, q, kind, beta)


def ref_topk(student_row, ids, teacher_logprobs, kind, beta, temperature):
    """k teacher tokens + one tail bucket on both sides, then τ applied to the buckets (module doc)."""
    q_all = softmax_list(student_row)
    q = [q_all[i] for i in ids]
    q.append(1.0 - sum(q))
    p = [math.exp(lp) for lp in teacher_logprobs]
    p.append(max(1.0 - sum(p), TAIL_FLOOR))
    p = [pi / sum(p) for pi in p]
    return temperature ** 2 * ref_divergence(temper(p, temperature), temper(q, temperature), kind, beta)


@pytest.fixture
def small():
    torch.manual_seed(0)
    B, T, V = 2, 3, 6
    return torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_full_teacher_matches_hand_computation(small, kind, beta, temperature):
    student, teacher = small
    got = divergence(student, teacher, kind, beta, temperature)
    want = [[ref_full(student[b, t].tolist(), teacher[b, t].tolist(), kind, beta, temperature)
             for t in range(student.shape[1])] for b in range(student.shape[0])]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    loss = token_kd_loss(student, teacher, mask, kind=kind, beta=beta, temperature=temperature)
    mean = sum(want[b][t] for b in range(2) for t in range(3) if mask[b, t]) / int(mask.sum())
    assert loss.item() == pytest.approx(mean, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_teacher_matches_hand_computation(small, kind, beta, temperature):
    student, teacher_logits = small
    teacher = topk_of(teacher_logits, k=3)
    got = divergence(student, teacher, kind, beta, temperature)
    want = [[ref_topk(student[b, t].tolist(), teacher.ids[b, t].tolist(), teacher.logprobs[b, t].tolist(),
                      kind, beta, temperature)
             for t in range(student.shape[1])] for b in range(student.shape[0])]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss = token_kd_loss(student, teacher, mask, kind=kind, beta=beta, temperature=temperature)
    assert loss.item() == pytest.approx(sum(sum(r) for r in want) / 6, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_padded_topk_slots_carry_no_mass(small, kind, beta):
    """Rows padded to a common k (id 0, log-prob -1e4, as encoding.encode_trajectory stores them) give the
    hand-computed loss of the row without pads, on both sides: token 0 stays in the student's tail."""
    from raysad.encoding import TOPK_PAD_LOGPROB

    student, teacher_logits = small
    teacher = topk_of(teacher_logits, k=3)
    # token 0 is not in these rows' top-3 or is: both cases must hold
    pad_ids = torch.cat([teacher.ids, torch.zeros(2, 3, 2, dtype=torch.long)], dim=-1)
    pad_lp = torch.cat([teacher.logprobs, torch.full((2, 3, 2), TOPK_PAD_LOGPROB)], dim=-1)
    got = divergence(student, TopK(pad_ids, pad_lp), kind, beta, 2.0)
    want = [[ref_topk(student[b, t].tolist(), teacher.ids[b, t].tolist(), teacher.logprobs[b, t].tolist(),
                      kind, beta, 2.0)
             for t in range(student.shape[1])] for b in range(student.shape[0])]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_topk_tail_is_floored_when_topk_holds_all_mass():
    # the teacher's k=2 tokens carry everything: the tail bucket is TAIL_FLOOR, so reverse KL stays finite
    student = torch.tensor([[[0.0, 0.0, 0.0, 0.0]]], requires_grad=True)
    teacher = TopK(torch.tensor([[[0, 1]]]), torch.tensor([[[math.log(0.5), math.log(0.5)]]]))
    got = divergence(student, teacher, "reverse_kl")
    want = ref_topk([0.0] * 4, [0, 1], [math.log(0.5)] * 2, "reverse_kl", 0.5, 1.0)
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
def test_zero_when_student_equals_teacher(small, kind, beta):
    _, teacher = small
    mask = torch.ones(2, 3, dtype=torch.bool)
    for temperature in (1.0, 2.0):
        full = token_kd_loss(teacher.clone(), teacher, mask, kind=kind, beta=beta, temperature=temperature)
        sparse = token_kd_loss(teacher.clone(), topk_of(teacher, 3), mask, kind=kind, beta=beta,
                               temperature=temperature)
        assert abs(full.item()) < 1e-6
        assert abs(sparse.item()) < 1e-6
        # and a different student is strictly positive under both forms
        assert token_kd_loss(teacher + torch.randn_like(teacher), teacher, mask, kind=kind, beta=beta).item() > 1e-3


def test_jsd_ends_follow_trl_convention(small):
    student, teacher = small
    for beta, end in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        torch.testing.assert_close(divergence(student, teacher, "jsd", beta=beta), divergence(student, teacher, end))


@pytest.mark.parametrize("kind,beta", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_topk_with_k_equal_vocab_equals_full_logits(kind, beta, temperature):
    torch.manual_seed(1)
    student = torch.randn(2, 4, 9, requires_grad=True)
    teacher = torch.randn(2, 4, 9) * 3
    mask = torch.rand(2, 4) > 0.3
    full = token_kd_loss(student, teacher, mask, kind=kind, beta=beta, temperature=temperature)
    (grad_full,) = torch.autograd.grad(full, student)
    sparse = token_kd_loss(student, topk_of(teacher, 9), mask, kind=kind, beta=beta, temperature=temperature)
    (grad_sparse,) = torch.autograd.grad(sparse, student)
    assert sparse.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_sparse, grad_full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("teacher_form", ["full", "topk"])
def test_gradient_only_through_masked_tokens(small, teacher_form):
    student, teacher = small
    student.requires_grad_(True)
    teacher = teacher if teacher_form == "full" else topk_of(teacher, 2)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    loss = token_kd_loss(student, teacher, mask, kind="jsd", temperature=2.0)
    loss.backward()
    assert (student.grad[~mask] == 0).all()
    assert (student.grad[mask].abs().sum(-1) > 0).all()


def test_gradient_only_through_masked_tokens_hidden_path():
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    lm_head = torch.randn(7, 4, requires_grad=True)
    teacher = torch.randn(2, 5, 7)
    mask = torch.rand(2, 5) > 0.5
    mask[0, 0], mask[1, 1] = True, False
    token_kd_loss(HiddenStates(hidden, lm_head), teacher, mask, chunk_size=2).backward()
    assert (hidden.grad[~mask] == 0).all()
    assert (hidden.grad[mask].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("teacher_form", ["full", "topk"])
def test_lambda_reason_zero_removes_reason_tokens_exactly(teacher_form):
    torch.manual_seed(3)
    B, T, V = 2, 6, 8
    teacher_logits = torch.randn(B, T, V)
    teacher = teacher_logits if teacher_form == "full" else topk_of(teacher_logits, 3)
    reason = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    act = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    labels = teacher_logits.argmax(-1)
    student = torch.randn(B, T, V, requires_grad=True)
    out = sad_loss(student, teacher, reason, act, lambda_reason=0.0, lambda_act=1.5, kind="reverse_kl",
                   temperature=2.0, labels=labels)
    out.total.backward()
    assert (student.grad[reason] == 0).all()
    assert (student.grad[act].abs().sum(-1) > 0).all()
    changed = student.detach().clone()
    changed[reason] = torch.randn(int(reason.sum()), V) * 5
    out2 = sad_loss(changed, teacher, reason, act, lambda_reason=0.0, lambda_act=1.5, kind="reverse_kl",
                    temperature=2.0, labels=labels)
    assert out2.total.item() == out.total.item()
    assert out2.reason_loss.item() != out.reason_loss.item()  # the logged part did see the change


def test_sad_parts_add_up_and_ce_matches_cross_entropy():
    torch.manual_seed(4)
    B, T, V = 2, 7, 10
    student = torch.randn(B, T, V, requires_grad=True)
    teacher = torch.randn(B, T, V)
    labels = torch.randint(0, V, (B, T))
    reason = torch.zeros(B, T, dtype=torch.bool)
    act = torch.zeros(B, T, dtype=torch.bool)
    reason[0, 1:4], reason[1, 0:2] = True, True
    act[0, 4:6], act[1, 3:7] = True, True
    out = sad_loss(student, teacher, reason, act, lambda_reason=0.7, lambda_act=1.3, kind="jsd", beta=0.3,
                   temperature=1.5, ce_weight=0.25, labels=labels, chunk_size=3)
    per_token = divergence(student, teacher, "jsd", 0.3, 1.5)
    assert out.reason_loss.item() == pytest.approx(per_token[reason].mean().item(), rel=1e-5)
    assert out.act_loss.item() == pytest.approx(per_token[act].mean().item(), rel=1e-5)
    used = reason | act
    ce_ref = F.cross_entropy(student[used], labels[used])
    assert out.ce_loss.item() == pytest.approx(ce_ref.item(), rel=1e-5)
    assert ce_loss(student, labels, used).item() == pytest.approx(ce_ref.item(), rel=1e-5)
    want = 0.7 * out.reason_loss + 1.3 * out.act_loss + 0.25 * out.ce_loss
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)
    assert (out.num_reason_tokens, out.num_act_tokens) == (5, 6)
    # gradient of total equals the autograd gradient of the same sum written with plain tensors
    (grad,) = torch.autograd.grad(out.total, student)
    ref = 0.7 * per_token[reason].mean() + 1.3 * per_token[act].mean() + 0.25 * ce_ref
    (grad_ref,) = torch.autograd.grad(ref, student)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-7)


def test_ce_loss_imitation_baseline_hidden_path():
    torch.manual_seed(5)
    hidden = torch.randn(1, 9, 5, requires_grad=True)
    lm_head = torch.randn(12, 5, requires_grad=True)
    labels = torch.randint(0, 12, (1, 9))
    mask = torch.rand(1, 9) > 0.4
    loss = ce_loss(HiddenStates(hidden, lm_head), labels, mask, chunk_size=2)
    ref = F.cross_entropy((hidden @ lm_head.T)[mask], labels[mask])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, [hidden, lm_head])
    grads_ref = torch.autograd.grad(ref, [hidden, lm_head])
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("teacher_form", ["full", "topk", "hidden"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_chunked_hidden_path_equals_plain_logits(teacher_form, chunk_size):
    torch.manual_seed(6)
    B, T, H, V = 2, 9, 6, 13
    hidden = torch.randn(B, T, H, requires_grad=True)
    lm_head = torch.randn(V, H, requires_grad=True)
    teacher_hidden, teacher_head = torch.randn(B, T, H), torch.randn(V, H)
    teacher_logits = teacher_hidden @ teacher_head.T
    teacher = {"full": teacher_logits, "topk": topk_of(teacher_logits, 4),
               "hidden": HiddenStates(teacher_hidden, teacher_head)}[teacher_form]
    plain_teacher = teacher_logits if teacher_form == "hidden" else teacher
    reason = torch.rand(B, T) > 0.6
    act = ~reason & (torch.rand(B, T) > 0.3)
    labels = torch.randint(0, V, (B, T))
    kwargs = dict(lambda_reason=0.8, lambda_act=1.2, kind="jsd", beta=0.4, temperature=2.0, ce_weight=0.1,
                  labels=labels)

    # plain: full logits materialised, per-token divergence with plain autograd, masked means written here
    logits = hidden @ lm_head.T
    per_token = divergence(logits, plain_teacher, "jsd", 0.4, 2.0)
    used = reason | act
    plain = (0.8 * per_token[reason].mean() + 1.2 * per_token[act].mean()
             + 0.1 * F.cross_entropy(logits[used], labels[used]))
    plain_grads = torch.autograd.grad(plain, [hidden, lm_head], retain_graph=True)

    chunked = sad_loss(HiddenStates(hidden, lm_head), teacher, reason, act, chunk_size=chunk_size, **kwargs)
    chunked_grads = torch.autograd.grad(chunked.total, [hidden, lm_head])
    assert chunked.total.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)
    for g, r in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)

    # the logits path with the same chunking gives the same too
    logits_leaf = logits.detach().requires_grad_(True)
    via_logits = sad_loss(logits_leaf, teacher, reason, act, chunk_size=chunk_size, **kwargs)
    assert via_logits.total.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)
    via_logits.total.backward()
    (grad_logits_ref,) = torch.autograd.grad(plain, logits)
    torch.testing.assert_close(logits_leaf.grad, grad_logits_ref, rtol=1e-4, atol=1e-7)


def test_backward_scales_with_upstream_gradient(small):
    student, teacher = small
    student.requires_grad_(True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    (g1,) = torch.autograd.grad(token_kd_loss(student, teacher, mask), student)
    (g3,) = torch.autograd.grad(3.0 * token_kd_loss(student, teacher, mask) + 1.0, student)
    torch.testing.assert_close(g3, 3.0 * g1)


def test_empty_segment_gives_finite_loss(small):
    student, teacher = small
    student.requires_grad_(True)
    act = torch.tensor([[False, True, True], [True, False, False]])
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    out = sad_loss(student, teacher, nothing, act, kind="reverse_kl")
    assert out.num_reason_tokens == 0 and out.reason_loss.item() == 0.0
    assert torch.isfinite(out.total) and out.total.item() == pytest.approx(out.act_loss.item())
    out.total.backward()
    assert torch.isfinite(student.grad).all()
    empty = sad_loss(student, topk_of(teacher, 2), nothing, nothing)
    assert empty.total.item() == 0.0 and empty.act_loss.item() == 0.0
    assert token_kd_loss(student, teacher, nothing).item() == 0.0


def test_masked_vocab_rows_stay_finite():
    # padded vocab rows set to -inf in both models must not produce nan (0 * inf) in any divergence
    torch.manual_seed(7)
    student = torch.randn(1, 4, 8)
    teacher = torch.randn(1, 4, 8)
    student[..., 6:] = float("-inf")
    teacher[..., 6:] = float("-inf")
    student.requires_grad_(True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    for kind, beta in DIVERGENCES:
        loss = token_kd_loss(student, teacher, mask, kind=kind, beta=beta, temperature=2.0)
        (grad,) = torch.autograd.grad(loss, student)
        want = sum(ref_full(student[0, t, :6].tolist(), teacher[0, t, :6].tolist(), kind, beta, 2.0)
                   for t in range(4)) / 4
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert torch.isfinite(grad).all() and (grad[..., 6:] == 0).all()


def test_no_grad_mode_gives_the_same_value(small):
    student, teacher = small
    mask = torch.ones(2, 3, dtype=torch.bool)
    with_grad = token_kd_loss(student.clone().requires_grad_(True), teacher, mask, kind="jsd")
    with torch.no_grad():
        without = token_kd_loss(student.clone().requires_grad_(True), teacher, mask, kind="jsd")
    assert not without.requires_grad
    assert without.item() == with_grad.item()


def test_bad_inputs_raise_clear_errors(small):
    student, teacher = small
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="same tokenizer"):
        token_kd_loss(student, teacher[..., :5], mask)
    with pytest.raises(ValueError, match="masks must be"):
        token_kd_loss(student, teacher, mask[:, :2])
    with pytest.raises(ValueError, match="kind must be one of"):
        token_kd_loss(student, teacher, mask, kind="kl")
    with pytest.raises(ValueError, match=r"ids must be in \[0, 6\)"):
        token_kd_loss(student, TopK(torch.full((2, 3, 2), 6), torch.zeros(2, 3, 2)), mask)
    with pytest.raises(ValueError, match="needs labels"):
        sad_loss(student, teacher, mask, ~mask, ce_weight=0.5)


def test_bfloat16_hidden_path_and_shifted_logits_view():
    torch.manual_seed(8)
    hidden = torch.randn(2, 6, 8)
    lm_head = torch.randn(20, 8) / 3
    teacher = torch.randn(2, 6, 20)
    mask = torch.rand(2, 6) > 0.3
    h16, w16 = hidden.bfloat16().requires_grad_(True), lm_head.bfloat16().requires_grad_(True)
    loss16 = token_kd_loss(HiddenStates(h16, w16), teacher, mask, kind="jsd", chunk_size=4)
    loss16.backward()
    assert h16.grad.dtype == torch.bfloat16 and w16.grad.dtype == torch.bfloat16
    h32, w32 = hidden.requires_grad_(True), lm_head.requires_grad_(True)
    loss32 = token_kd_loss(HiddenStates(h32, w32), teacher, mask, kind="jsd")
    loss32.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=3e-2)
    torch.testing.assert_close(w16.grad.float(), w32.grad, rtol=0.1, atol=2e-3)
    # a shifted, non-contiguous view of model logits (what the distill stage passes) works as is
    logits = torch.randn(2, 7, 20, requires_grad=True)
    shifted = logits[:, :-1]
    loss = token_kd_loss(shifted, teacher, mask, chunk_size=5)
    loss.backward()
    (ref_grad,) = torch.autograd.grad((divergence(logits[:, :-1], teacher)[mask]).mean(), logits)
    torch.testing.assert_close(logits.grad, ref_grad)


def test_global_normalizers_make_split_batches_equal_the_whole_batch():
    """Micro-batches / workers with global token counts as normalizers sum to the whole-batch loss and grads."""
    torch.manual_seed(0)
    B, T, V = 4, 6, 11
    logits = torch.randn(B, T, V, requires_grad=True)
    teacher = torch.randn(B, T, V)
    reason = torch.rand(B, T) < 0.4
    act = (torch.rand(B, T) < 0.5) & ~reason
    labels = torch.randint(0, V, (B, T))
    kwargs = dict(lambda_reason=0.7, lambda_act=1.3, ce_weight=0.5, labels=labels)
    whole = sad_loss(logits, teacher, reason, act, **kwargs).total
    (g_whole,) = torch.autograd.grad(whole, logits)
    n_r, n_a, n_u = int(reason.sum()), int(act.sum()), int((reason | act).sum())
    parts = sum(
        sad_loss(logits[s], teacher[s], reason[s], act[s], reason_normalizer=n_r, act_normalizer=n_a,
                 ce_normalizer=n_u, **{**kwargs, "labels": labels[s]}).total
        for s in (slice(0, 1), slice(1, 4)))
    (g_parts,) = torch.autograd.grad(parts, logits)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert torch.allclose(g_whole, g_parts, atol=1e-7)
    mask = reason | act
    kd_whole = token_kd_loss(logits, teacher, mask)
    kd_parts = sum(token_kd_loss(logits[s], teacher[s], mask[s], normalizer=n_u) for s in (slice(0, 2), slice(2, 4)))
    assert torch.allclose(kd_whole, kd_parts, atol=1e-6)


def test_chunked_loss_under_autocast_bf16():
    """Under autocast the lm_head product comes out in bf16 while hidden states stay float32: grads still flow."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    lm_head = torch.randn(13, 8, requires_grad=True)
    teacher = torch.randn(2, 5, 13)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_kd_loss(HiddenStates(hidden, lm_head), teacher, mask)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad.dtype == torch.float32 and hidden.grad.abs().sum() > 0
