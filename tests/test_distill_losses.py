import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimkit
from slimkit import IncompatibleError, uniform_layer_map
from slimkit.distill import align, attention_kd, build_projector, feature_loss, logit_kd, mean_pool, task_cross_entropy


def direct_kd(s, t, T):
    """The textbook formula, written out: T^2 * mean_b sum_c p_t (log p_t - log p_s)."""
    p_t = torch.softmax(t / T, -1)
    return T**2 * (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_logit_kd_matches_direct_formula(T):
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    total, count = logit_kd(s, t, T)
    assert count.item() == 8
    torch.testing.assert_close(total / count, direct_kd(s, t, T))
    # and against torch's own KL divergence
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(total / count, ref * T**2)


def test_mixed_loss_formula_against_direct_computation():
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    recipe = {"distill": {"temperature": 3.0, "alpha": 0.25}}
    slimkit.prepare(student, recipe, teacher=teacher, example_inputs=torch.randn(2, 4), measure=False)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    student.train()
    out = student(x)
    loss = slimkit.compute_loss(student, out, labels=y)
    with torch.no_grad():
        t_logits = teacher(x)
    expected = 0.25 * direct_kd(out, t_logits, 3.0) + 0.75 * F.cross_entropy(out, y)
    torch.testing.assert_close(loss, expected)


def test_logit_kd_gradient_is_T_times_prob_difference():
    """d(T^2 KL)/dz_s = T (softmax(z_s/T) - softmax(z_t/T)): the T^2 factor keeps the gradient's
    scale from shrinking as 1/T (Hinton et al.)."""
    torch.manual_seed(0)
    t = torch.randn(4, 6)
    for T in (1.0, 3.0, 8.0):
        s = torch.randn(4, 6, requires_grad=True)
        total, count = logit_kd(s, t, T)
        (total / count).backward()
        expected = T * (torch.softmax(s.detach() / T, -1) - torch.softmax(t / T, -1)) / 4
        torch.testing.assert_close(s.grad, expected)


def test_logit_kd_is_stable_for_huge_logits():
    s = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0]])
    total, _ = logit_kd(s, t, 1.0)
    total.backward()
    assert torch.isfinite(total) and total > 1e3
    assert torch.isfinite(s.grad).all()


def test_token_level_ignores_minus_100_and_padding():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[1, -100, 2, 3, 4], [0, 1, -100, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    total, count = logit_kd(s, t, 2.0, labels, mask)
    assert count.item() == 7  # 10 positions - 2 ignored labels - 1 padding
    valid = (labels != -100) & mask.bool()
    torch.testing.assert_close(total / count, direct_kd(s[valid], t[valid], 2.0))
    # what happens at ignored / padded positions does not matter
    s2 = s.clone()
    s2[~valid] = 100.0
    torch.testing.assert_close(logit_kd(s2, t, 2.0, labels, mask)[0], total)


def test_causal_lm_logits_are_shifted_like_the_task_loss():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    labels = torch.randint(0, 9, (2, 6))
    total, count = logit_kd(s, t, 1.0, labels, causal=True)
    assert count.item() == 10  # 2 x (6 - 1)
    torch.testing.assert_close(total / count, direct_kd(s[:, :-1].reshape(-1, 9), t[:, :-1].reshape(-1, 9), 1.0))
    # the last position predicts nothing; the first label is never a target
    s2, labels2 = s.clone(), labels.clone()
    s2[:, -1] = 50.0
    labels2[:, 0] = -100
    torch.testing.assert_close(logit_kd(s2, t, 1.0, labels2, causal=True)[0], total)
    # the task loss uses the same shift as transformers' causal LM loss
    ce_total, ce_count = task_cross_entropy(s, labels, causal=True)
    ref = F.cross_entropy(s[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(ce_total / ce_count, ref)


def test_logit_shape_mismatch_is_refused():
    with pytest.raises(IncompatibleError, match=r"student logits \(2, 5\) and teacher logits \(2, 7\)"):
        logit_kd(torch.randn(2, 5), torch.randn(2, 7), 2.0)


def test_feature_loss_mse_cosine_and_token_mask():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    total, count = feature_loss(s, t)
    torch.testing.assert_close(total / count, F.mse_loss(s, t))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    total, count = feature_loss(s, t, "mse", mask)
    assert count.item() == 6
    torch.testing.assert_close(total / count, F.mse_loss(s[mask.bool()], t[mask.bool()]))
    total, count = feature_loss(s, t, "cosine")
    torch.testing.assert_close(total / count, (1 - F.cosine_similarity(s, t, dim=-1)).mean())
    maps = torch.randn(2, 3, 4, 4)
    assert feature_loss(maps, maps)[0].item() == 0.0
    total, count = feature_loss(maps, maps * 2, "cosine")
    assert count.item() == 32 and abs(total.item()) < 1e-5  # same direction per pixel


def test_mean_pooled_feature_loss_ignores_padding():
    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled_s = torch.stack([s[0, :2].mean(0), s[1].mean(0)])
    pooled_t = torch.stack([t[0, :2].mean(0), t[1].mean(0)])
    torch.testing.assert_close(mean_pool(s, mask), pooled_s)
    total, count = feature_loss(s, t, "cosine", mask, pool="mean")
    assert count.item() == 2
    torch.testing.assert_close(total / count, (1 - F.cosine_similarity(pooled_s, pooled_t, dim=-1)).mean())
    padded = s.clone()
    padded[0, 2:] = 1e3  # what the padded positions hold must not move the sentence embedding
    torch.testing.assert_close(feature_loss(padded, t, "cosine", mask, "mean")[0], total)
    maps = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(mean_pool(maps), maps.mean(dim=(2, 3)))


def test_relation_loss_compares_pairwise_similarities_not_features():
    torch.manual_seed(0)
    t = torch.randn(6, 16)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16))
    scaled = t * torch.rand(6, 1).add(0.5)  # each sample rescaled: its cosines are unchanged
    for same in (t @ rotation, scaled):
        total, count = feature_loss(same, t, "relation")
        assert count.item() == 36 and total.item() < 1e-8
    assert feature_loss(t @ rotation, t, "cosine")[0].item() > 1.0  # a feature loss would see it
    other = torch.randn(6, 16, requires_grad=True)
    total, count = feature_loss(other, t, "relation")
    s_sim = F.cosine_similarity(other[:, None], other[None], dim=-1)
    t_sim = F.cosine_similarity(t[:, None], t[None], dim=-1)
    torch.testing.assert_close(total / count, (s_sim - t_sim).pow(2).mean())
    total.backward()
    assert other.grad is not None and other.grad.abs().sum() > 0
    tokens, mask = torch.randn(3, 5, 8), torch.tensor([[1, 1, 1, 0, 0]] * 3)
    noisy = tokens.clone()
    noisy[:, 3:] = torch.randn(3, 2, 8)  # padding differs, valid tokens agree: no relation loss
    assert feature_loss(noisy, tokens, "relation", mask)[0].item() < 1e-8


def test_attention_kd_per_head_average_and_masks():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    other = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    assert attention_kd(probs, probs)[0].abs().item() < 1e-5
    total, count = attention_kd(other, probs, "per_head")
    assert count.item() == 2 * 4 * 5
    expected = (probs * (probs.log() - other.log())).sum(-1).mean()
    torch.testing.assert_close(total / count, expected)
    # different head counts: head-averaged maps
    two_heads = torch.softmax(torch.randn(2, 2, 5, 5), -1)
    total, count = attention_kd(two_heads, probs)
    a, b = two_heads.mean(1), probs.mean(1)
    torch.testing.assert_close(total / count, (b * (b.log() - a.log())).sum(-1).mean())
    with pytest.raises(IncompatibleError, match="heads=per_head: student has 2 heads and teacher has 4"):
        attention_kd(two_heads, probs, "per_head")
    with pytest.raises(IncompatibleError, match="cover different tokens"):
        attention_kd(torch.softmax(torch.randn(2, 4, 6, 6), -1), probs)
    # padded query rows do not count
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    total, count = attention_kd(other, probs, "per_head", mask)
    assert count.item() == 8 * 4


def test_projectors_and_alignment():
    linear = build_projector((2, 10, 16), (2, 12, 32), ("s", "t"))
    assert isinstance(linear, nn.Linear) and (linear.in_features, linear.out_features) == (16, 32)
    conv = build_projector((2, 8, 4, 4), (2, 32, 2, 2), ("s", "t"))
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 32
    assert isinstance(build_projector((2, 16), (2, 16), ("s", "t")), nn.Identity)
    tokens = align(torch.randn(2, 10, 32), torch.randn(2, 12, 32))
    assert tokens.shape == (2, 12, 32)
    pooled = align(torch.ones(2, 32, 8, 8), torch.randn(2, 32, 2, 2))
    assert pooled.shape == (2, 32, 2, 2) and torch.allclose(pooled, torch.ones(2, 32, 2, 2))
    assert align(torch.randn(2, 32, 2, 2), torch.randn(2, 32, 7, 7)).shape == (2, 32, 7, 7)


@pytest.mark.parametrize(
    "student, teacher, reason",
    [
        ((2, 8, 4, 4), (2, 10, 32), "they have different ranks"),
        ((2, 8), (3, 8), "their batch sizes differ"),
        ((2, 3, 4, 5, 6), (2, 3, 4, 5, 6), "only [B, C], [B, N, C] and [B, C, H, W]"),
    ],
)
def test_unalignable_features_name_both_modules(student, teacher, reason):
    with pytest.raises(IncompatibleError) as err:
        build_projector(student, teacher, ("layer4", "blocks.11"))
    assert "'layer4'" in str(err.value) and "'blocks.11'" in str(err.value) and reason in str(err.value)


def test_uniform_layer_map():
    assert uniform_layer_map(3, 12) == [(0, 3), (1, 7), (2, 11)]
    assert uniform_layer_map(4, 6) == [(0, 1), (1, 2), (2, 4), (3, 5)]  # round half up: 1.5 -> 2
    assert uniform_layer_map(6, 6) == [(i, i) for i in range(6)]
    assert uniform_layer_map(1, 12) == [(0, 11)]
    for n_s, n_t in [(2, 7), (5, 3), (6, 12)]:
        pairs = uniform_layer_map(n_s, n_t)
        assert pairs[-1] == (n_s - 1, n_t - 1)
        assert all(0 <= t < n_t for _, t in pairs)
        assert [t for _, t in pairs] == sorted(t for _, t in pairs)
