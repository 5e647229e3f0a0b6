"""MaCo's losses as pure functions of tensors (no module state).

docs/method.md §6. `reconstruction_loss` is the MAE term (§6.1); `correlation_weighted_contrastive_loss` is the
released four-term form of decision D5 (§6.3), and `clip_loss` the plain symmetric InfoNCE it reduces to when
every correlation weight is 1 (at initialisation they are all softplus(0) = ln 2, not 1). Half and bfloat16 inputs are computed in float32; float64 stays float64.
"""

import torch
import torch.nn.functional as F


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half and bfloat16 to float32 (losses under autocast); leave float32 and float64 as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def reconstruction_loss(pred, target, mask, norm_pix: bool = False):
    """Eq. (rec): mean squared error per patch, averaged over masked patches only.

    pred, target: (B, L, P) patch vectors; mask: (B, L), 1 = masked (predicted), 0 = visible.
    norm_pix: normalise each target patch to zero mean and unit variance first (off in MaCo's recipe).
    """
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((at_least_float32(pred) - at_least_float32(target)) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


def contrastive_logits(img_emb, txt_emb, logit_scale):
    """L = s * normalize(img) @ normalize(txt).T, at least in float32: row i is image i against every report. (G, G)"""
    img = F.normalize(at_least_float32(img_emb), dim=-1)
    txt = F.normalize(at_least_float32(txt_emb), dim=-1)
    return at_least_float32(logit_scale) * img @ txt.T


def without_negatives(logits, excluded):
    """The logits with the excluded (i, j) pairs set to -inf, so they are not negatives in a cross-entropy row (and
    get no gradient). excluded: (G, G) bool, symmetric, False on the diagonal; None leaves the logits as they are.
    An option (MaCoConfig.mask_identical_captions): pairs whose captions are identical are false negatives."""
    return logits if excluded is None else logits.masked_fill(excluded, float("-inf"))


def clip_loss(img_emb, txt_emb, logit_scale, excluded=None):
    """Symmetric InfoNCE: 1/2 [CE(L) + CE(L^T)], pair i's target is i. img_emb, txt_emb (G, D); scalar logit_scale.
    excluded: optional (G, G) bool of pairs that are not negatives (`without_negatives`)."""
    logits = without_negatives(contrastive_logits(img_emb, txt_emb, logit_scale), excluded)  # (G, G)
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def correlation_weighted_contrastive_loss(img_emb, txt_emb, correlation_weights, logit_scale, excluded=None):
    """Decision D5, exactly the released form:

        L_con = 1/4 [ CE(diag(c) L) + CE(diag(c) L^T) + WCE(L; sg(c)) + WCE(L^T; sg(c)) ]

    img_emb, txt_emb: (G, D), not normalised. correlation_weights c: (G,) positive, one per pair.
    logit_scale s: scalar tensor (already clamped). Row i of either direction is scaled by c_i, the weight of
    pair i. WCE is PyTorch's weighted cross-entropy: sum_i c_i CE_i / sum_i c_i, with c detached, so the
    correlation head learns only through the scaled logits of the first two terms.
    excluded: optional (G, G) bool of pairs that are not negatives, set to -inf after the scaling (`without_negatives`).
    """
    logits = contrastive_logits(img_emb, txt_emb, logit_scale)  # (G, G)
    targets = torch.arange(logits.shape[0], device=logits.device)
    c = at_least_float32(correlation_weights)
    scaled_i2t = without_negatives(c[:, None] * logits, excluded)  # (G, G) row i scaled by c_i
    scaled_t2i = without_negatives(c[:, None] * logits.T, excluded)
    logits = without_negatives(logits, excluded)
    c_detached = c.detach()
    return (F.cross_entropy(scaled_i2t, targets) + F.cross_entropy(scaled_t2i, targets)
            + F.cross_entropy(logits, targets, weight=c_detached)
            + F.cross_entropy(logits.T, targets, weight=c_detached)) / 4
