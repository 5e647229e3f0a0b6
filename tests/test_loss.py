"""The losses against the hand-computed values of the worked example (docs/method.md §6.1 and §6.5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from loss import clip_loss, correlation_weighted_contrastive_loss, reconstruction_loss

# Worked example of docs/method.md §6.5: G = 3 pairs, width 2, N = 4 patches, s = 5.
IMG = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
TXT = torch.tensor([[4.0, 3.0], [1.0, 1.0], [0.0, -5.0]], dtype=torch.float64)
VISIBLE = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.float64)
W = torch.tensor([0.5, -0.25, 1.0, 0.25], dtype=torch.float64)
B = 0.1


def worked_example_loss(w, b, scale=5.0):
    weights = F.softplus(VISIBLE @ w + b)  # (3,)
    return correlation_weighted_contrastive_loss(IMG, TXT, weights, torch.tensor(scale, dtype=torch.float64))


def test_worked_example_weights_match_docs():
    weights = F.softplus(VISIBLE @ W + B)
    assert torch.allclose(weights, torch.tensor([0.883382, 1.783901, 1.580509], dtype=torch.float64), atol=1e-6)


def test_worked_example_loss_matches_docs():
    # loss.py keeps float64 inputs in float64; the documented value is rounded to 6 decimals
    assert worked_example_loss(W, B).item() == pytest.approx(0.602858, abs=1e-6)


def test_worked_example_four_terms_match_docs():
    """Each of the four terms, rebuilt from per-row cross-entropies, against the table of docs/method.md §6.5."""
    c = F.softplus(VISIBLE @ W + B)
    logits = 5.0 * F.normalize(IMG, dim=1) @ F.normalize(TXT, dim=1).T
    expected_logits = torch.tensor([[4.8, 4.949747, -4.0], [3.0, 3.535534, -5.0], [0.707107, 0.0, 3.535534]],
                                   dtype=torch.float64)
    assert torch.allclose(logits, expected_logits, atol=1e-6)
    y = torch.arange(3)
    t1 = F.cross_entropy(c[:, None] * logits, y)
    t2 = F.cross_entropy(c[:, None] * logits.T, y)
    per_row = F.cross_entropy(logits, y, reduction="none")
    t3 = (c * per_row).sum() / c.sum()
    t4 = (c * F.cross_entropy(logits.T, y, reduction="none")).sum() / c.sum()
    assert [t.item() for t in (t1, t2, t3, t4)] == pytest.approx([0.367405, 0.935936, 0.385357, 0.722734], abs=1e-6)
    assert ((t1 + t2 + t3 + t4) / 4).item() == pytest.approx(worked_example_loss(W, B).item(), abs=1e-6)


def test_worked_example_at_init_matches_docs():
    # at init w = b = 0, so c = ln 2 for every pair, and s = 1/0.03
    loss = worked_example_loss(torch.zeros(4, dtype=torch.float64), 0.0, scale=1 / 0.03)
    assert loss.item() == pytest.approx(1.540282, abs=1e-5)


def test_gradients_of_correlation_head_match_docs():
    w = W.clone().requires_grad_(True)
    b = torch.tensor(B, dtype=torch.float64, requires_grad=True)
    worked_example_loss(w, b).backward()
    assert torch.allclose(w.grad, torch.tensor([0.065276, -0.015134, 0.077434, -0.002977], dtype=torch.float64),
                          atol=2e-6)
    assert b.grad.item() == pytest.approx(0.062300, abs=2e-6)


def test_correlation_head_learns_only_through_scaled_logit_terms():
    """Dropping the detached weighted terms (T3, T4) leaves the gradient w.r.t. the weights unchanged."""
    weights = F.softplus(VISIBLE @ W + B).float().requires_grad_(True)
    img, txt, scale = IMG.float(), TXT.float(), torch.tensor(5.0)
    (grad_full,) = torch.autograd.grad(correlation_weighted_contrastive_loss(img, txt, weights, scale), weights)
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    y = torch.arange(3)
    scaled_terms_only = (F.cross_entropy(weights[:, None] * logits, y)
                         + F.cross_entropy(weights[:, None] * logits.T, y)) / 4
    (grad_scaled,) = torch.autograd.grad(scaled_terms_only, weights)
    assert torch.allclose(grad_full, grad_scaled, atol=1e-7)
    assert grad_full.abs().sum() > 0


def test_weighted_loss_with_unit_weights_equals_clip_loss():
    torch.manual_seed(0)
    img, txt, scale = torch.randn(8, 16), torch.randn(8, 16), torch.tensor(7.0)
    weighted = correlation_weighted_contrastive_loss(img, txt, torch.ones(8), scale)
    assert weighted.item() == pytest.approx(clip_loss(img, txt, scale).item(), abs=1e-6)
    # the documented pin for the worked example with weighting off
    assert clip_loss(IMG, TXT, torch.tensor(5.0)).item() == pytest.approx(0.520307, abs=1e-6)


def test_scaling_all_weights_leaves_the_detached_terms_unchanged():
    """WCE divides by the sum of weights, so only the first two terms can see a common factor."""
    torch.manual_seed(1)
    img, txt, scale = torch.randn(6, 4), torch.randn(6, 4), torch.tensor(3.0)
    weights = torch.rand(6) + 0.5
    logits = scale * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    y = torch.arange(6)
    wce = lambda c: F.cross_entropy(logits, y, weight=c) + F.cross_entropy(logits.T, y, weight=c)
    assert wce(weights).item() == pytest.approx(wce(4 * weights).item(), abs=1e-6)
    scaled_terms = lambda c: (F.cross_entropy(c[:, None] * logits, y) + F.cross_entropy(c[:, None] * logits.T, y))
    total = lambda c: correlation_weighted_contrastive_loss(img, txt, c, scale)
    assert (total(4 * weights) - total(weights)).item() == pytest.approx(
        ((scaled_terms(4 * weights) - scaled_terms(weights)) / 4).item(), abs=1e-6)


def test_reconstruction_loss_averages_over_masked_patches_only():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third patch is visible: its huge error must not count
    # per-patch MSE: 1 and 2; mean over the two masked patches = 1.5
    assert reconstruction_loss(pred, target, mask).item() == pytest.approx(1.5)


def test_reconstruction_loss_normalises_each_target_patch():
    target = torch.tensor([[[1.0, 3.0], [10.0, 20.0]]])
    mask = torch.ones(1, 2)
    # each patch normalised to (-1/sqrt(2), +1/sqrt(2)) with the unbiased variance; predicting that gives ~0
    normalised = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0]]]) / math.sqrt(2)
    assert reconstruction_loss(normalised, target, mask, norm_pix=True).item() == pytest.approx(0.0, abs=1e-6)
    assert reconstruction_loss(normalised, target, mask, norm_pix=False).item() > 1.0


def test_float64_inputs_stay_float64_and_match_hand_written_formulas_to_1e_12():
    """The losses upcast half precision only: float64 in, float64 out, equal to the formulas of 6.3 in float64."""
    c = F.softplus(VISIBLE @ W + B)
    scale = torch.tensor(5.0, dtype=torch.float64)
    logits = scale * F.normalize(IMG, dim=1) @ F.normalize(TXT, dim=1).T
    log_softmax_diag = lambda x: x.log_softmax(dim=1).diagonal()  # noqa: E731
    t1 = -log_softmax_diag(c[:, None] * logits).mean()
    t2 = -log_softmax_diag(c[:, None] * logits.T).mean()
    t3 = -(c * log_softmax_diag(logits)).sum() / c.sum()
    t4 = -(c * log_softmax_diag(logits.T)).sum() / c.sum()
    weighted = correlation_weighted_contrastive_loss(IMG, TXT, c, scale)
    plain = clip_loss(IMG, TXT, scale)
    assert weighted.dtype == torch.float64 and plain.dtype == torch.float64
    assert weighted.item() == pytest.approx(((t1 + t2 + t3 + t4) / 4).item(), abs=1e-12)
    assert plain.item() == pytest.approx(((-log_softmax_diag(logits).mean() - log_softmax_diag(logits.T).mean()) / 2).item(), abs=1e-12)
    assert reconstruction_loss(IMG[None], TXT[None], torch.ones(1, 3, dtype=torch.float64)).dtype == torch.float64


def test_half_precision_inputs_are_upcast_to_float32():
    img, txt = IMG.to(torch.bfloat16), TXT.to(torch.bfloat16)
    assert clip_loss(img, txt, torch.tensor(5.0, dtype=torch.bfloat16)).dtype == torch.float32
    assert correlation_weighted_contrastive_loss(img, txt, torch.ones(3, dtype=torch.float16),
                                                 torch.tensor(5.0)).dtype == torch.float32


def test_gradcheck_of_both_contrastive_losses_in_float64():
    """Analytic gradients equal finite differences in float64 (to 1e-8): both losses in the embeddings and the
    temperature; the weighted one also in the weights c, where by design (sg(c)) only the scaled-logit terms
    T1, T2 carry a gradient, so the check subtracts the value of the detached terms T3, T4."""
    generator = torch.Generator().manual_seed(0)
    img = torch.randn(5, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    txt = torch.randn(5, 4, dtype=torch.float64, generator=generator).requires_grad_(True)
    weights = torch.rand(5, dtype=torch.float64, generator=generator) + 0.5
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    check = lambda f, inputs: torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)  # noqa: E731
    assert check(clip_loss, (img, txt, scale))
    assert check(lambda i, t, s: correlation_weighted_contrastive_loss(i, t, weights, s), (img, txt, scale))
    y = torch.arange(5)

    def scaled_terms_gradient_only(c):
        logits = scale.detach() * F.normalize(img.detach(), dim=1) @ F.normalize(txt.detach(), dim=1).T
        detached_terms = (F.cross_entropy(logits, y, weight=c.detach()) + F.cross_entropy(logits.T, y, weight=c.detach())) / 4
        return correlation_weighted_contrastive_loss(img.detach(), txt.detach(), c, scale.detach()) - detached_terms

    assert check(scaled_terms_gradient_only, (weights.clone().requires_grad_(True),))


# ----------------------------------------------------------------------------------------------------------
# An option: pairs with identical captions are not negatives (MaCoConfig.mask_identical_captions)

def _identical_caption_pairs():
    excluded = torch.zeros(4, 4, dtype=torch.bool)
    excluded[0, 2] = excluded[2, 0] = True  # pairs 0 and 2 have the same caption
    return excluded


def test_excluded_pairs_leave_the_rows_as_if_those_columns_were_removed():
    torch.manual_seed(0)
    img, txt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    scale = torch.tensor(7.0, dtype=torch.float64)
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    by_hand = 0.0
    for matrix in (logits, logits.T):  # each row's softmax over its own column and the columns not excluded
        for i in range(4):
            kept = [j for j in range(4) if j == i or not _identical_caption_pairs()[i, j]]
            by_hand += -(matrix[i, i] - torch.logsumexp(matrix[i, kept], 0)) / 8
    assert torch.allclose(clip_loss(img, txt, scale, _identical_caption_pairs()), by_hand, atol=1e-12)
    assert not torch.allclose(clip_loss(img, txt, scale), by_hand, atol=1e-6)  # the option changes the loss


def test_no_excluded_pair_is_the_loss_without_the_option():
    torch.manual_seed(1)
    img, txt, c = torch.randn(4, 6), torch.randn(4, 6), torch.rand(4) + 0.5
    nothing = torch.zeros(4, 4, dtype=torch.bool)
    assert torch.equal(clip_loss(img, txt, torch.tensor(5.0), nothing), clip_loss(img, txt, torch.tensor(5.0)))
    assert torch.equal(correlation_weighted_contrastive_loss(img, txt, c, torch.tensor(5.0), nothing),
                       correlation_weighted_contrastive_loss(img, txt, c, torch.tensor(5.0)))


def test_weighted_loss_with_excluded_pairs_matches_its_four_terms_by_hand():
    torch.manual_seed(2)
    img, txt = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    c, scale, excluded = torch.rand(4, dtype=torch.float64) + 0.5, torch.tensor(6.0, dtype=torch.float64), \
        _identical_caption_pairs()
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T

    def row_ce(matrix, i):
        kept = [j for j in range(4) if j == i or not excluded[i, j]]
        return -(matrix[i, i] - torch.logsumexp(matrix[i, kept], 0))

    scaled = [sum(row_ce(c[:, None] * m, i) for i in range(4)) / 4 for m in (logits, logits.T)]
    weighted = [sum(c[i] * row_ce(m, i) for i in range(4)) / c.sum() for m in (logits, logits.T)]
    by_hand = (sum(scaled) + sum(weighted)) / 4
    assert torch.allclose(correlation_weighted_contrastive_loss(img, txt, c, scale, excluded), by_hand, atol=1e-12)


def test_gradcheck_with_excluded_pairs_and_no_gradient_through_them():
    torch.manual_seed(3)
    img = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    c = torch.rand(4, dtype=torch.float64) + 0.5  # fixed: its weight in WCE is detached, which gradcheck cannot see
    scale = torch.tensor(4.0, dtype=torch.float64)
    excluded = _identical_caption_pairs()
    assert torch.autograd.gradcheck(lambda a, b: correlation_weighted_contrastive_loss(a, b, c, scale, excluded),
                                    (img, txt))
    assert torch.autograd.gradcheck(lambda a, b: clip_loss(a, b, scale, excluded), (img, txt))
    c.requires_grad_()
    loss = correlation_weighted_contrastive_loss(img, txt, c, scale, excluded)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (img, txt, c)))  # no 0 * inf
