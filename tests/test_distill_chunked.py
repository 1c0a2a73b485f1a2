"""Large-vocabulary logit KD: the chunked pass equals the unchunked form (loss and gradient),
holds far less memory, and takes over a causal LM's own token CE without changing it."""

import copy

import pytest
import torch
import torch.nn.functional as F

import slimkit
from benchmarks.memory import peak_bytes  # counts the tensors a step allocates (CPU too)
from slimkit.distill import attention_kd, feature_loss, logit_kd, task_cross_entropy
from slimkit.distill.losses import logit_kd_and_ce
from tests.families import hf_model


def reference(s, t, labels, mask, T, alpha):
    """The textbook, unchunked losses of a causal LM: logits shifted, masked rows dropped."""
    s, t = s[:, :-1].float(), t[:, :-1].float()
    y, m = labels[:, 1:], mask[:, 1:].bool()
    keep = m & (y != -100)
    log_p_s = F.log_softmax(s[keep] / T, -1)
    log_p_t = F.log_softmax(t[keep] / T, -1)
    kd = T**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
    ce = F.cross_entropy(s[keep], y[keep])
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
@pytest.mark.parametrize("T", [1.0, 3.0])
def test_chunked_kd_and_ce_equal_the_unchunked_loss_and_gradient(chunk, T):
    torch.manual_seed(0)
    B, L, V = 2, 7, 50
    t = torch.randn(B, L, V) * 3
    labels = torch.randint(0, V, (B, L))
    labels[0, 2] = -100
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    s = (torch.randn(B, L, V) * 3).requires_grad_()
    ref_s = s.detach().clone().requires_grad_()
    kd, kd_n, ce, ce_n = logit_kd_and_ce(s, t, T, labels, mask, causal=True, with_ce=True, chunk_rows=chunk)
    loss = 0.3 * kd / kd_n + 0.7 * ce / ce_n
    loss.backward()
    expected = reference(ref_s, t, labels, mask, T, 0.3)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.grad, ref_s.grad, rtol=1e-5, atol=1e-7)
    # padded and ignored positions get no gradient, whatever they hold
    assert s.grad[1, 4:].abs().sum() == 0 and s.grad[:, -1].abs().sum() == 0


def test_chunked_loss_ignores_non_finite_padding_and_keeps_bf16_gradients():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 16, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        t[0, 3:] = float("nan")  # padding may hold anything
    total, count = logit_kd(s, t, 2.0, attention_mask=mask, chunk_rows=2)
    assert total.dtype == torch.float32 and torch.isfinite(total) and count.item() == 8
    total.backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
    # computed in fp32 from the bf16 values: equal to the fp32 computation on the same numbers
    ref, _ = logit_kd(s.detach().float(), t.float(), 2.0, attention_mask=mask)
    torch.testing.assert_close(total, ref)


def test_kd_terms_are_fp32_under_autocast():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 32)
    x, t = torch.randn(4, 8), torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        total, count = logit_kd(logits, t, 2.0)
        ce, n = task_cross_entropy(logits, torch.tensor([1, 2, 3, 4]))
    assert logits.dtype == torch.bfloat16
    assert total.dtype == ce.dtype == torch.float32
    torch.testing.assert_close(total, logit_kd(logits.detach().float(), t, 2.0)[0])
    # feature and attention terms too: bf16 inputs, fp32 arithmetic
    feats = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    target = torch.randn(2, 6, 8, dtype=torch.bfloat16)
    probs = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mse, _ = feature_loss(feats, target)
        att, _ = attention_kd(probs.bfloat16(), probs.flip(1).bfloat16(), "average")
    assert mse.dtype == att.dtype == torch.float32
    torch.testing.assert_close(mse, ((feats.float() - target.float()) ** 2).mean(-1).sum())
    ref, _ = attention_kd(probs.bfloat16().float(), probs.flip(1).bfloat16().float(), "average")
    torch.testing.assert_close(att, ref)


def test_kd_step_peak_memory_stays_near_a_plain_ce_step():
    """At 8k vocabulary x 256 tokens: the KD + CE step (teacher logits held, both losses) peaks
    at most 1.3x a plain cross-entropy step; the unchunked form needs far more."""
    torch.manual_seed(0)
    P, V = 256, 8192
    s0, t = torch.randn(P, V), torch.randn(P, V)
    y = torch.randint(0, V, (P,))

    def plain():
        s = s0.clone().requires_grad_()
        F.cross_entropy(s, y).backward()

    def chunked():
        s = s0.clone().requires_grad_()
        kd, n, ce, m = logit_kd_and_ce(s, t, 2.0, y, with_ce=True)
        (0.5 * kd / n + 0.5 * ce / m).backward()

    def unchunked():
        s = s0.clone().requires_grad_()
        log_p_s, log_p_t = F.log_softmax(s / 2.0, -1), F.log_softmax(t / 2.0, -1)
        kd = 4.0 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        (0.5 * kd + 0.5 * F.cross_entropy(s, y)).backward()

    base, ours, naive = peak_bytes(plain), peak_bytes(chunked), peak_bytes(unchunked)
    assert ours <= 1.3 * base, (ours / base, naive / base)
    assert naive > 1.5 * base  # what chunking saves


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_causal_lm_task_loss_is_the_models_own_cross_entropy(kind):
    """slimkit keeps the labels from the LM and computes its CE in the KD pass: the mixed loss is
    alpha * KD + (1 - alpha) * (the model's own loss), with and without num_items_in_batch."""
    student, teacher = hf_model(kind), hf_model(kind, seed=1)
    plain = copy.deepcopy(student)
    slimkit.prepare(student, {"distill": {"alpha": 0.25, "temperature": 2.0}}, teacher=teacher)
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    student.train()
    plain.train()
    for items in (None, torch.tensor(20)):
        extra = {} if items is None else {"num_items_in_batch": items}
        out = student(input_ids=ids, labels=labels, **extra)
        own = plain(input_ids=ids, labels=labels, **extra).loss
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        kd, n, _, _ = logit_kd_and_ce(out.logits.detach(), t_logits, 2.0, labels, causal=True)
        scale = 1.0 if items is None else float(n) / 20
        expected = 0.25 * kd / n * scale + 0.75 * own
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
        logged = slimkit.log_values(student)
        torch.testing.assert_close(torch.tensor(logged["distill/task"]), own.detach(), rtol=1e-5, atol=1e-6)
    # eval forwards are the model's own
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            student(input_ids=ids, labels=labels).loss, plain.eval()(input_ids=ids, labels=labels).loss
        )


def lm_step_peaks(monkeypatch, take_over: bool) -> tuple[int, int]:
    """Peak memory of one training step of a GPT-2 with an 8k vocabulary on 2 x 128 tokens:
    the model's own CE step, and the KD step (teacher forward, KD + task loss, backward)."""
    from slimkit.plugins.hf_adapters import HFAdapter

    if not take_over:
        monkeypatch.setattr(HFAdapter, "loss_is_token_cross_entropy", lambda self, model: False)
    kw = dict(vocab_size=8192, n_positions=128, bos_token_id=0, eos_token_id=0)
    student, teacher = hf_model("gpt2", **kw), hf_model("gpt2", seed=1, **kw)
    plain = copy.deepcopy(student).train()
    slimkit.prepare(student, {"distill": {"alpha": 0.5}}, teacher=teacher)
    student.train()
    ids = torch.randint(0, 8192, (2, 128), generator=torch.Generator().manual_seed(0))
    return (
        peak_bytes(lambda: plain(input_ids=ids, labels=ids).loss.backward()),
        peak_bytes(lambda: student(input_ids=ids, labels=ids).loss.backward()),
    )


def test_causal_lm_kd_step_peak_memory_near_its_plain_step(monkeypatch):
    plain, kd = lm_step_peaks(monkeypatch, take_over=True)
    assert kd <= 1.3 * plain, kd / plain


def test_without_taking_over_the_lm_loss_the_kd_step_needs_more(monkeypatch):
    plain, kd = lm_step_peaks(monkeypatch, take_over=False)
    assert kd > 1.3 * plain, kd / plain  # why slimkit computes the LM's CE in the KD pass
