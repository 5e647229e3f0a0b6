"""Evaluation metrics as plain functions of arrays (docs/method.md §8 and §9; D9, D10).

Classification: ROC AUC in the Mann-Whitney form (ties count one half), its macro mean with a bootstrap 95%
interval, F1 (positive class, and the released support-weighted variant) and accuracy at 0.5. Items whose label
is NaN (uncertain) are left out. Segmentation: the per-image, pooled and positive-image Dice of segment.py, from
per-image overlap counts, with bootstrap intervals. Grounding: Gaussian smoothing that matches scipy's
`gaussian_filter`, the contrast-to-noise ratio, IoU over thresholds and the pointing game, on maps in [-1, 1] and
0/1 box masks. Detection: COCO box average precision (AP over IoU 0.50:0.05:0.95, AP50, AP75) with bootstrap
intervals over images.
"""
import numpy as np
import torch

IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5)

# ----------------------------------------------------------------------------- classification metrics

def nanmean(values) -> float:
    """Mean over the non-NaN values; NaN (without a warning) if there are none."""
    values = np.asarray(values, np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")


def _known(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """float64 labels and scores without the items whose label is NaN (uncertain)."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    return labels[~np.isnan(labels)], scores[~np.isnan(labels)]


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative), ties counting 1/2
    (Mann-Whitney U / (n+ n-)), via average ranks in O(n log n). NaN labels are ignored; NaN if one class is absent."""
    labels, scores = _known(labels, scores)
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores)  # tied scores share their average rank, so the order among them is irrelevant
    sorted_scores = scores[order]
    new_group = np.concatenate([[True], sorted_scores[1:] != sorted_scores[:-1]])
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], len(scores))
    ranks = np.empty(len(scores))
    ranks[order] = ((starts + 1 + ends) / 2.0)[np.cumsum(new_group) - 1]  # 1-based rank, averaged over ties
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates), from (0, 0) to (1, 1), one point per distinct score."""
    labels, scores = _known(labels, scores)
    order = np.argsort(-scores, kind="stable")
    labels, scores = labels[order], scores[order]
    last_of_group = np.append(scores[1:] != scores[:-1], True)
    true_pos = np.cumsum(labels)[last_of_group]
    false_pos = (np.flatnonzero(last_of_group) + 1) - true_pos
    return (np.concatenate([[0.0], false_pos / max(false_pos[-1], 1)]),
            np.concatenate([[0.0], true_pos / max(true_pos[-1], 1)]))


def _f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    true_pos = np.sum(truth & predicted)
    denominator = 2 * true_pos + np.sum(~truth & predicted) + np.sum(truth & ~predicted)
    return float(2 * true_pos / denominator) if denominator else 0.0


def _decisions(labels, scores, threshold) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = _known(labels, scores)
    # p > 0.5 equals the released np.round(p) on [0, 1] (round half to even sends 0.5 to 0)
    return labels == 1, scores > threshold


def f1_positive(labels, scores, threshold: float = 0.5) -> float:
    """F1 of the positive class at `threshold` (0 when undefined)."""
    truth, predicted = _decisions(labels, scores, threshold)
    return _f1(truth, predicted)


def f1_support_weighted(labels, scores, threshold: float = 0.5) -> float:
    """The released metric: mean of the class-1 and class-0 F1 weighted by their supports
    (scikit-learn average='weighted'), not the positive-class F1."""
    truth, predicted = _decisions(labels, scores, threshold)
    if len(truth) == 0:
        return float("nan")
    n_pos = truth.sum()
    return float((n_pos * _f1(truth, predicted) + (len(truth) - n_pos) * _f1(~truth, ~predicted)) / len(truth))


def accuracy(labels, scores, threshold: float = 0.5) -> float:
    truth, predicted = _decisions(labels, scores, threshold)
    return float(np.mean(truth == predicted)) if len(truth) else float("nan")


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Unweighted mean over classes (columns) of the AUC, over the classes where it is defined."""
    return nanmean([roc_auc(labels[:, c], scores[:, c]) for c in range(labels.shape[1])])


def percentile_interval(samples, level: float = 0.95) -> list[float]:
    """[low, high] percentiles of bootstrap samples around their middle `level` share, NaN samples left out;
    [nan, nan] if none is left."""
    samples = np.asarray(samples, np.float64)
    samples = samples[~np.isnan(samples)]
    if len(samples) == 0:
        return [float("nan")] * 2
    return [float(b) for b in np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])]


def bootstrap_macro_auc_ci(labels, scores, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the macro AUC, resampling images with replacement (seeded)."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    rng = np.random.default_rng(seed)
    low, high = percentile_interval([macro_auc(labels[idx], scores[idx]) for idx in
                                     (rng.integers(0, len(labels), len(labels)) for _ in range(n_boot))], level)
    return low, high


def classification_metrics(labels, scores, class_names: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per-class AUC, F1 (positive-class and support-weighted), accuracy; macro means; bootstrap CI of the macro AUC."""
    labels, scores = np.asarray(labels, np.float64), np.asarray(scores, np.float64)
    per_class = {}
    for c, name in enumerate(class_names):
        y, p = labels[:, c], scores[:, c]
        per_class[name] = dict(auc=roc_auc(y, p), f1=f1_positive(y, p), f1_support_weighted=f1_support_weighted(y, p),
                               accuracy=accuracy(y, p), n_pos=int(np.sum(y == 1)), n_neg=int(np.sum(y == 0)))
    macro = {key: nanmean([m[key] for m in per_class.values()])
             for key in ("f1", "f1_support_weighted", "accuracy")}
    return dict(n_images=len(labels), macro_auc=macro_auc(labels, scores),
                macro_auc_ci95=list(bootstrap_macro_auc_ci(labels, scores, n_boot, seed)),
                **{f"macro_{key}": value for key, value in macro.items()}, per_class=per_class)


# ----------------------------------------------------------------------------- segmentation metrics

def overlap_counts(predicted, truth) -> np.ndarray:
    """Per image (intersection, predicted pixels, true pixels) of bool masks (N, H, W): (N, 3) int64. Every
    segmentation Dice below is a function of these counts, so a bootstrap resamples rows, not masks."""
    predicted, truth = to_numpy(predicted).astype(bool), to_numpy(truth).astype(bool)
    axes = tuple(range(1, predicted.ndim))
    return np.stack([(predicted & truth).sum(axes), predicted.sum(axes), truth.sum(axes)], axis=1).astype(np.int64)


def per_image_dice(counts) -> np.ndarray:
    """Dice 2|P ∩ T| / (|P| + |T|) of each image (N,); the released rule for an empty truth: 1 if the prediction
    is empty too, else 0."""
    inter, pred, true = np.asarray(counts, np.float64).T
    total = pred + true
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def dice_scores(counts, pixels=None) -> dict:
    """med_dice: the released per-image Dice averaged over all images (the validation metric of the released
    configs); pooled_dice: one Dice of all pixels of all images (the foreground Dice the released test.sh prints);
    positive_dice: the per-image Dice over images with a non-empty truth (NaN if none). With `pixels` (N,), each
    image's pixel count: also background_dice (the same pooled Dice of the background class) and m_dice, the mean
    of the two classes' Dice (test.sh's mDice)."""
    counts = np.asarray(counts, np.int64).reshape(-1, 3)
    dice = per_image_dice(counts)
    inter, pred, true = counts.sum(axis=0)
    positive = counts[:, 2] > 0
    scores = dict(med_dice=float(dice.mean()) if len(dice) else float("nan"),
                  pooled_dice=float(2 * inter / (pred + true)) if pred + true else 1.0,
                  positive_dice=float(dice[positive].mean()) if positive.any() else float("nan"))
    if pixels is not None:
        total = int(np.sum(pixels))  # background: what is neither predicted nor true, from the same counts
        scores["background_dice"] = float(2 * (total - pred - true + inter) / (2 * total - pred - true))
        scores["m_dice"] = (scores["background_dice"] + scores["pooled_dice"]) / 2
    return scores


def segmentation_metrics(counts, n_boot: int = 1000, seed: int = 0, level: float = 0.95, pixels=None) -> dict:
    """dice_scores of the (N, 3) counts (and `pixels` (N,)), each with a percentile bootstrap interval (images
    resampled with replacement, seeded), and the numbers of images and positive images."""
    counts = np.asarray(counts, np.int64).reshape(-1, 3)
    scores = dice_scores(counts, pixels)
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(counts), len(counts)) for _ in range(n_boot)]
    resampled = [dice_scores(counts[rows], None if pixels is None else np.asarray(pixels)[rows]) for rows in draws]
    for name in list(scores):
        scores[f"{name}_ci95"] = percentile_interval([r[name] for r in resampled], level)
    return dict(scores, n_images=len(counts), n_positive=int((counts[:, 2] > 0).sum()))


# ----------------------------------------------------------------------------- detection metrics

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # 0.50, 0.55, ..., 0.95
COCO_RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # the 101-point interpolation


def box_iou(boxes, others) -> np.ndarray:
    """IoU of boxes (N, 4) with boxes (M, 4), both (x1, y1, x2, y2) in pixels: (N, M). Continuous coordinates,
    area = width x height, as pycocotools."""
    a, b = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(others, np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    intersection = width * height  # (N, M)
    area_a, area_b = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1), 0.0)


def match_detections(boxes, scores, truth, thresholds=COCO_IOU_THRESHOLDS, max_dets: int = 100):
    """COCO's greedy matching in one image. Detections (N, 4) with scores (N,) are taken in descending score order
    (the first max_dets); each is matched, at each IoU threshold t, to the not yet matched true box (K, 4) of
    highest IoU, if that IoU is >= t. Returns (scores (n,), matched (T, n) bool: True = a true positive, False =
    a false positive, e.g. a duplicate of a box already found), n = min(N, max_dets)."""
    scores = np.asarray(scores, np.float64).reshape(-1)
    order = np.argsort(-scores, kind="mergesort")[:max_dets]
    ious = box_iou(np.asarray(boxes).reshape(-1, 4)[order], truth)  # (n, K)
    matched = np.zeros((len(thresholds), len(order)), dtype=bool)
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(ious.shape[1], dtype=bool)
        for d in range(len(order)):
            candidates = np.where(taken, -1.0, ious[d])  # (K,) a matched true box is out of reach
            best = int(np.argmax(candidates)) if len(candidates) else -1
            if best >= 0 and candidates[best] >= min(threshold, 1 - 1e-10):
                matched[t, d], taken[best] = True, True
    return scores[order], matched


def average_precision(scores, matched, n_truth: int) -> np.ndarray:
    """AP at each IoU threshold (T,) of all images' detections pooled: scores (n,), matched (T, n) as returned by
    match_detections and concatenated over images, n_truth true boxes in all. Precision is made monotone (the
    envelope) and read at 101 recall points; a recall never reached counts as precision 0 (pycocotools'
    accumulate). NaN when there is no true box."""
    if n_truth == 0:
        return np.full(matched.shape[0], np.nan)
    if matched.shape[1] == 0:  # no detection at all: no recall is reached
        return np.zeros(matched.shape[0])
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    true_pos = np.cumsum(matched[:, order], axis=1, dtype=np.float64)  # (T, n)
    false_pos = np.cumsum(~matched[:, order], axis=1, dtype=np.float64)
    recall = true_pos / n_truth
    precision = true_pos / (true_pos + false_pos + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # best precision at this recall or beyond
    ap = np.zeros(matched.shape[0])
    for t in range(matched.shape[0]):
        index = np.searchsorted(recall[t], COCO_RECALL_POINTS, side="left")  # (101,) first point reaching each recall
        reached = index < recall.shape[1]
        ap[t] = np.where(reached, precision[t, np.minimum(index, recall.shape[1] - 1)], 0.0).mean()
    return ap


def matched_images(predictions: list, truths: list) -> list:
    """Per image (scores (n,), matched (T, n), number of true boxes): COCO's matching, done once, from which
    ap_summary scores any resample of the images."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} images of predictions, {len(truths)} of true boxes")
    return [(*match_detections(boxes, scores, truth), len(np.asarray(truth).reshape(-1, 4)))
            for (boxes, scores), truth in zip(predictions, truths)]


def ap_summary(per_image: list, chosen) -> dict:
    """AP, AP50, AP75 of the images `chosen` (indices, repeats allowed) of matched_images' list."""
    scores = np.concatenate([per_image[i][0] for i in chosen])
    matched = np.concatenate([per_image[i][1] for i in chosen], axis=1)
    ap = average_precision(scores, matched, sum(per_image[i][2] for i in chosen))  # (T,)
    return dict(ap=float(np.mean(ap)), ap50=float(ap[0]), ap75=float(ap[5]), ap_per_threshold=ap.tolist())


def box_ap_metrics(predictions: list, truths: list, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """COCO box AP (mean over IoU 0.50:0.05:0.95), AP50 and AP75 of one class, maxDets 100, with percentile
    bootstrap intervals (test images resampled with replacement, seeded). predictions: per image (boxes (N, 4),
    scores (N,)); truths: per image true boxes (K, 4); boxes (x1, y1, x2, y2). An image without a true box adds
    only false positives."""
    per_image = matched_images(predictions, truths)
    result = ap_summary(per_image, range(len(per_image)))
    rng = np.random.default_rng(seed)
    resampled = [ap_summary(per_image, rng.integers(0, len(per_image), len(per_image))) for _ in range(n_boot)]
    for name in ("ap", "ap50", "ap75"):
        result[f"{name}_ci95"] = percentile_interval([r[name] for r in resampled], level)
    return dict(result, n_images=len(truths), n_boxes=sum(p[2] for p in per_image))


# ----------------------------------------------------------------------------- grounding metrics

def to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if torch.is_tensor(x) else np.asarray(x)


def gaussian_smooth(maps: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Gaussian filter over the last two dims (..., H, W), matching scipy.ndimage.gaussian_filter's defaults:
    separable kernel of radius floor(4 sigma + 0.5), weights ∝ exp(-x²/2σ²) summing to 1, half-sample
    reflection at the borders (d c b a | a b c d | d c b a), repeated for borders wider than the map."""
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    for dim in (-1, -2):
        n = maps.shape[dim]
        index = torch.arange(-radius, n + radius, device=maps.device) % (2 * n)
        index = torch.where(index >= n, 2 * n - 1 - index, index)  # reflected source index of each padded position
        windows = maps.index_select(dim, index).unfold(dim, 2 * radius + 1, 1)  # (..., H, W, 2r+1)
        maps = windows @ kernel
    return maps


def cnr(heatmap, box_mask) -> float:
    """Contrast-to-noise ratio (μ_A − μ_Ā) / sqrt(σ²_A + σ²_Ā), signed, population variances, A = box region;
    0 if the denominator is 0, NaN if A or its complement is empty."""
    heat, inside = to_numpy(heatmap).astype(np.float64), to_numpy(box_mask).astype(bool)
    if inside.all() or not inside.any():
        return float("nan")
    box, rest = heat[inside], heat[~inside]
    denominator = np.sqrt(box.var() + rest.var())
    return float((box.mean() - rest.mean()) / denominator) if denominator > 0 else 0.0


def iou_at_thresholds(heatmap, box_mask, thresholds=IOU_THRESHOLDS) -> np.ndarray:
    """IoU of {heatmap > t} with the box region for each t, (T,); NaN where either set is empty."""
    heat, inside = to_numpy(heatmap), to_numpy(box_mask).astype(bool)
    ious = []
    for t in thresholds:
        predicted = heat > t
        union = np.sum(predicted | inside)
        ious.append(np.sum(predicted & inside) / union if predicted.any() and inside.any() else float("nan"))
    return np.array(ious, np.float64)


def miou(heatmap, box_mask, thresholds=IOU_THRESHOLDS) -> float:
    """Mean IoU over thresholds for one pair. Averaging this over pairs equals the released order (mean over
    pairs per threshold, then over thresholds) whenever no IoU is NaN."""
    return float(np.mean(iou_at_thresholds(heatmap, box_mask, thresholds)))


def pointing_game(heatmap, box_mask) -> float:
    """1 if any pixel attaining the map's maximum lies in the box region, else 0."""
    heat, inside = to_numpy(heatmap), to_numpy(box_mask).astype(bool)
    return float(inside[heat == heat.max()].any())


def interval_table(results: list[dict], metric_names: dict[str, str], key: str = "test") -> str:
    """Test metrics (%) with their bootstrap 95% intervals, as segment.py and detect.py print them: a block per metric
    (`metric_names`: key in each result's `key` dict -> title), a row per initialisation, a column per (data set,
    label fraction)."""
    columns = sorted({(r["data"], r["label_fraction"]) for r in results})
    labels = list(dict.fromkeys(r["init_label"] for r in results))
    width = max(map(len, labels + list(metric_names.values()))) + 6
    blocks = []
    for metric, title in metric_names.items():
        rows = [f"{title + ' (%)':<{width}}" + "".join(f"{f'{data} {100 * f:g}%':>22}" for data, f in columns)]
        for label in labels:
            cells = {(r["data"], r["label_fraction"]): r[key] for r in results if r["init_label"] == label}
            rows.append(f"{label:<{width}}" + "".join(
                f"{100 * cells[c][metric]:.1f} [{100 * cells[c][metric + '_ci95'][0]:.1f}, "
                f"{100 * cells[c][metric + '_ci95'][1]:.1f}]".rjust(22) if c in cells else f"{'-':>22}"
                for c in columns))
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)
