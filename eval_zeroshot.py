"""Zero-shot classification and phrase grounding of a trained MaCo model (docs/method.md §8, §9; D9, D10).

Zero-shot (§8): a class is scored by comparing the image embedding z with the mean embedding of its positive
prompts and of its negative prompts: p = softmax([z·e+, z·e-])[0] = sigmoid(z·(e+ - e-)), raw dot products as
released (cosine as an option). Metrics: ROC AUC per class (Mann-Whitney, ties count 1/2) and its macro mean
with a bootstrap 95% interval, F1 and accuracy at 0.5.
Grounding (§9): a similarity map per (image, phrase) from the patch embeddings weighted by the correlation
head's spatial prior (released; `--readout cosine`: each patch's cosine with the phrase, no prior), smoothed,
upsampled and scaled to [-1, 1]; CNR, mIoU over 5 thresholds, pointing game. Every pair is also scored with
another finding's phrase and with the empty phrase: maps that ground the words change with them (§9).
Diagnostics of why a model grounds or does not (text separation, patch-phrase alignment, prior coverage,
patch probe, embedding geometry, the words-alone reference) live in tools/diagnostics.py.

    python eval_zeroshot.py --ckpt runs/maco/checkpoint.pt              # synthetic test split (data/synthetic)
    python eval_zeroshot.py --ckpt ckpt.pt --data nih --root /data/NIH   # or rsna, siim, chexpert, ms-cxr
    python eval_zeroshot.py --ckpt maco.pth --tokenizer mimic_wordpiece.json --data nih --root /data/NIH  # released
Evaluation-set loaders live in util/eval_datasets.py.
"""
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from loss import at_least_float32
from maco import load
from util import eval_datasets
from util.checkpoint import check_writable, write_atomic, write_json
from util.cli import check_options, option, run_script
from util.devices import PRECISIONS, autocast, describe_precision, pick_device, resolve_precision
from util.metrics import (
    IOU_THRESHOLDS,
    classification_metrics,
    cnr,
    gaussian_smooth,
    iou_at_thresholds,
    miou,
    nanmean,
    pointing_game,
    roc_auc,
    roc_curve,
    to_numpy,
)
from util.progress import lines_every, progress_interval_option, track
from util.tokenizer import encode_texts

# Released prompt lists (official ZeroShot/utils/prompts.py:3-31); {c} is the lower-cased class name.
PROMPT_SETS = {
    "default": (["There is {c}. "],
                ["the lung is clear.", "There is no {c}. ", "no {c}. ", "no evidence of {c}. "]),
    "siim": (["Abnormal collection of air in the pleural space between the lung and the chest wall. ", "There is {c}. "],
             ["the lung is clear.", "There is no {c}. ", "no {c}. ", "no evidence of {c}. ",
              "The lung parenchyma is homogeneous, and the lung markings are normal and symmetrical. "]),
}


def class_prompts(class_names: list[str], prompt_set: str = "default") -> dict[str, tuple[list[str], list[str]]]:
    """{class name: (positive prompts, negative prompts)} from a released prompt set."""
    positives, negatives = PROMPT_SETS[prompt_set]
    return {name: ([p.format(c=name.lower()) for p in positives], [n.format(c=name.lower()) for n in negatives])
            for name in class_names}


# ----------------------------------------------------------------------------- model-dependent parts

def _model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Text embeddings e_T (len(texts), D), float32 also under bf16 autocast; the tokenizer prepends [CLS] (§4).
    Call model.eval() first."""
    batch = encode_texts(tokenizer, texts, max_len=model.cfg.max_len)
    device = _model_device(model)
    return at_least_float32(model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device)))


@torch.no_grad()
def class_embeddings(model, tokenizer, prompts: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean positive and mean negative prompt embeddings per class, unnormalised: ((C, D), (C, D))."""
    texts = [text for pos, neg in prompts.values() for text in pos + neg]
    embeddings = embed_texts(model, tokenizer, texts)  # (total prompts, D)
    means, start = [], 0
    for pos, neg in prompts.values():
        means.append(embeddings[start:start + len(pos)].mean(0))
        means.append(embeddings[start + len(pos):start + len(pos) + len(neg)].mean(0))
        start += len(pos) + len(neg)
    means = torch.stack(means).view(len(prompts), 2, -1)  # (C, 2, D)
    return means[:, 0], means[:, 1]


def prompt_scores(image_emb: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, cosine: bool = False) -> torch.Tensor:
    """p = softmax([z·e+, z·e-])[0] = sigmoid(z·(e+ − e-)) per image and class: (B, D), (C, D), (C, D) -> (B, C).
    `cosine` L2-normalises z, e+ and e- first. Computed in float32, also under bf16 autocast."""
    with torch.autocast(image_emb.device.type, enabled=False):
        image_emb, positive, negative = (at_least_float32(x) for x in (image_emb, positive, negative))
        if cosine:
            image_emb, positive, negative = (F.normalize(x, dim=-1) for x in (image_emb, positive, negative))
        logits = torch.stack([image_emb @ positive.T, image_emb @ negative.T], dim=-1)  # (B, C, 2)
        return logits.softmax(-1)[..., 0]


@torch.no_grad()
def zero_shot_scores(model, images: torch.Tensor, class_prompts: dict, tokenizer, cosine: bool = False) -> torch.Tensor:
    """Class probabilities (B, C) for preprocessed images (B, C_in, S, S), released scoring (§8, D9)."""
    positive, negative = class_embeddings(model, tokenizer, class_prompts)
    _, image_emb = model.encode_image(images.to(_model_device(model)))  # (B, D): projected patches, averaged
    return prompt_scores(image_emb, positive, negative, cosine)


def grounding_caption(phrase: str) -> str:
    """§9 text rule: split at '.', keep pieces longer than 5 characters (with '. ' appended) that hold no '_'
    and do not start with ','; lower-case and join. Falls back to the whole phrase if nothing is kept."""
    pieces = [piece.strip() + ". " for piece in phrase.split(".")]
    kept = [piece.lower() for piece in pieces if len(piece) > 5 and "_" not in piece and not piece.startswith(",")]
    return "".join(kept) or phrase.strip().lower() + ". "


READOUTS = ("prior", "cosine")  # the first is the default of evaluate_grounding and of the command line


def maps_from_patches(patch_emb: torch.Tensor, phrase_embs: torch.Tensor, prior: torch.Tensor, size: int,
                      readout: str = "prior", sigma: float = 1.5) -> torch.Tensor:
    """Grounding maps from patch embeddings (B, N, D) and phrase embeddings (B, D): CPU (B, size, size) in [-1, 1].

    readout "prior" (released, D10): S_n = alpha_n P_n . t with the spatial prior `prior` = alpha (N,), a raw dot
    product. readout "cosine": S_n = cos(P_n, t) without the prior (as BioViL reads its maps): a patch counts by
    its direction only, and no position is favoured before the phrase is read. Float32 at least, also under bf16
    autocast."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    batch, num_patches, _ = patch_emb.shape
    patch_emb = at_least_float32(patch_emb)
    phrase_embs = phrase_embs.to(patch_emb.device, patch_emb.dtype)
    with torch.autocast(patch_emb.device.type, enabled=False):
        if readout == "prior":
            weighted = patch_emb * prior.to(patch_emb.device, patch_emb.dtype)[:, None]  # (B, N, D) alpha_n P_n
            similarity = torch.einsum("bnd,bd->bn", weighted, phrase_embs)  # (B, N) raw dot product
        else:
            similarity = torch.einsum("bnd,bd->bn", F.normalize(patch_emb, dim=-1), F.normalize(phrase_embs, dim=-1))
    grid = int(round(num_patches ** 0.5))
    # float64 on the CPU (the maps are small): min-max scaling must tell a flat map from rounding noise
    maps = gaussian_smooth(similarity.view(batch, grid, grid).cpu().double(), sigma)  # (B, g, g), sigma in patches
    maps = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]  # (B, S, S)
    return scale_to_unit_range(maps).float()  # (B, S, S)


def scale_to_unit_range(maps: torch.Tensor, tolerance: float = 1e-9) -> torch.Tensor:
    """Min-max scale each map of (B, H, W) to [-1, 1]. A map whose spread is within `tolerance` of its magnitude (a
    constant map, up to rounding) becomes 0."""
    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    spread = high - low
    has_contrast = spread > tolerance * torch.maximum(high.abs(), low.abs())
    return torch.where(has_contrast, 2 * (maps - low) / torch.where(has_contrast, spread, 1.0) - 1, 0.0)


def phrase_embeddings(model, tokenizer, phrases) -> torch.Tensor:
    """Phrase embeddings (B, D) from strings (each through grounding_caption; "" is the empty phrase, the bare
    [CLS]) or from embeddings (B, D) or (D,) already computed."""
    if isinstance(phrases, str):
        phrases = [phrases]
    if isinstance(phrases, (list, tuple)):
        phrases = embed_texts(model, tokenizer, [grounding_caption(p) if p.strip() else "" for p in phrases])
    return phrases.reshape(-1, phrases.shape[-1])


@torch.no_grad()
def similarity_map(model, images: torch.Tensor, phrases, tokenizer=None, sigma: float = 1.5,
                   prior_temperature: float = 0.02, readout: str = "prior") -> torch.Tensor:
    """Grounding maps (D10). images: (B, C, S, S) or (C, S, S), preprocessed; phrases: text embeddings (B, D)
    or (D,), or strings (then `tokenizer` is needed; "" is the empty phrase). readout: "prior" (released) or
    "cosine" (see maps_from_patches). Returns CPU maps (B, S, S) (or (S, S)) in [-1, 1]."""
    single = images.dim() == 3
    images = (images[None] if single else images).to(_model_device(model))
    phrase_embs = phrase_embeddings(model, tokenizer, phrases).to(images.device)  # (B, D)
    patch_emb, _ = model.encode_image(images)  # (B, N, D) projected patch tokens P_I(h_n)
    maps = maps_from_patches(patch_emb, phrase_embs, model.spatial_prior(prior_temperature), images.shape[-1],
                             readout, sigma)
    return maps[0] if single else maps


# ----------------------------------------------------------------------------- evaluation loops

def _loader(dataset, batch_size: int, workers: int):
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def zero_shot_predictions(model, tokenizer, dataset, class_names: list[str], prompt_set: str = "default",
                          cosine: bool = False, batch_size: int = 32, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) and labels (N, C) over a dataset of (image, labels) pairs, in dataset order."""
    model.eval()
    positive, negative = class_embeddings(model, tokenizer, class_prompts(class_names, prompt_set))
    all_scores, all_labels = [], []
    for images, labels in track(_loader(dataset, batch_size, workers), "zero-shot"):
        _, image_emb = model.encode_image(images.to(_model_device(model)))
        all_scores.append(prompt_scores(image_emb, positive, negative, cosine).cpu())
        all_labels.append(labels)
    return torch.cat(all_scores).numpy(), torch.cat(all_labels).numpy()


def evaluate_zero_shot(model, tokenizer, dataset, class_names: list[str], prompt_set: str = "default",
                       cosine: bool = False, batch_size: int = 32, workers: int = 0, n_boot: int = 1000,
                       seed: int = 0, out_dir=None) -> dict:
    """Zero-shot metrics over a dataset of (image, labels) pairs; with `out_dir`, also roc_curves.png there."""
    scores, labels = zero_shot_predictions(model, tokenizer, dataset, class_names, prompt_set, cosine, batch_size,
                                           workers)
    metrics = classification_metrics(labels, scores, class_names, n_boot, seed)
    metrics.update(prompt_set=prompt_set, scoring="cosine" if cosine else "dot")
    if out_dir is not None:
        plot_roc(labels, scores, class_names, Path(out_dir) / "roc_curves.png", metrics["macro_auc"])
    return metrics


def grounding_summary(pairs: list[dict]) -> dict:
    """Means over pairs (released `iou`/`cnr`) and over categories of per-category means (released `*_cat`)."""
    keys = ("cnr", "abs_cnr", "miou", "pointing_game")
    ious = np.array([pair["iou"] for pair in pairs])  # (pairs, thresholds)
    overall = {key: nanmean([pair[key] for pair in pairs]) for key in keys}
    overall["miou"] = float(np.mean(ious.mean(0)))  # mean over pairs per threshold, then over thresholds (§9)
    overall["iou_per_threshold"] = dict(zip(map(str, IOU_THRESHOLDS), ious.mean(0).tolist()))
    per_category = {}
    for category in sorted({pair["category"] for pair in pairs}):
        members = [pair for pair in pairs if pair["category"] == category]
        per_category[category] = dict(n_pairs=len(members), **{key: nanmean([p[key] for p in members]) for key in keys})
    category_mean = {key: nanmean([m[key] for m in per_category.values()]) for key in keys}
    return dict(n_pairs=len(pairs), overall=overall, category_mean=category_mean, per_category=per_category)


def swapped_phrases(pairs) -> tuple[list[str], list[bool]]:
    """For each grounding pair, the phrase of a pair of a *different* finding: the first such pair on the same
    image (dataset order), else, when the image shows one finding only, the next pair in dataset order
    (cyclically) of another category. Deterministic. Returns (phrases, taken-from-the-same-image flags); a
    dataset with one category only gets "" (the empty phrase) throughout."""
    by_image = {}
    for index, pair in enumerate(pairs):
        by_image.setdefault(pair.path, []).append(index)
    phrases, same_image = [], []
    for index, pair in enumerate(pairs):
        others = [j for j in by_image[pair.path] if pairs[j].category != pair.category]
        if not others:
            following = (j % len(pairs) for j in range(index + 1, index + len(pairs)))
            others = [j for j in following if pairs[j].category != pair.category][:1]
        phrases.append(pairs[others[0]].phrase if others else "")
        same_image.append(bool(others) and pairs[others[0]].path == pair.path)
    return phrases, same_image


PHRASES = ("true", "swapped", "prior_only")  # its own phrase, another finding's phrase, the empty phrase


@torch.no_grad()
def evaluate_grounding(model, tokenizer, dataset, batch_size: int = 16, workers: int = 0, out_dir=None,
                       n_overlays: int = 8, readout: str = READOUTS[0]) -> dict:
    """Grounding metrics over a `eval_datasets.GroundingDataset`; with `out_dir`, overlays of the first pairs.

    Phrase specificity: every pair is scored three times on the same image, with its own phrase (the headline
    rows), with the phrase of a different finding (`swapped`, see swapped_phrases) and with the empty phrase
    (`prior_only`: the bare [CLS] embedding, what the prior and the image give without words). A model that
    grounds words scores far lower with the swapped phrase than with its own. Both readouts are measured:
    `readout` picks the headline one, the other's three summaries (and pairs) are kept under `other_readout`.
    A box that floors to nothing in the model's frame (a few pixels wide at a small input size) has no
    defined metric: such pairs are counted as `skipped_empty_boxes`, not scored."""
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    model.eval()
    swapped, same_image = swapped_phrases(dataset.pairs)
    empty = phrase_embeddings(model, tokenizer, [""])  # (1, D)
    prior = model.spatial_prior()  # (N,)
    scored = {(r, c): [] for r in READOUTS for c in PHRASES}
    skipped, start = 0, 0
    for batch in track(_loader(dataset, batch_size, workers), "grounding"):
        n = len(batch["phrase"])
        patch_emb, _ = model.encode_image(batch["image"].to(_model_device(model)))  # (B, N, D)
        phrase_embs = {"true": phrase_embeddings(model, tokenizer, list(batch["phrase"])),
                       "swapped": phrase_embeddings(model, tokenizer, swapped[start:start + n]),
                       "prior_only": empty.expand(n, -1)}  # each (B, D)
        for r in READOUTS:
            for c in PHRASES:
                maps = maps_from_patches(patch_emb, phrase_embs[c], prior, batch["image"].shape[-1], r)
                for i, heat in enumerate(maps):
                    mask = batch["mask"][i]
                    if not mask.any():
                        continue
                    pair = dict(path=batch["path"][i], phrase=batch["phrase"][i], category=batch["category"][i],
                                cnr=cnr(heat, mask), miou=miou(heat, mask), iou=iou_at_thresholds(heat, mask).tolist(),
                                pointing_game=pointing_game(heat, mask))
                    pair["abs_cnr"] = abs(pair["cnr"])
                    if c == "swapped":
                        pair.update(swapped_phrase=swapped[start + i], swapped_same_image=same_image[start + i])
                    done = len(scored[r, c])
                    if r == readout and c == "true" and out_dir is not None and done < n_overlays:
                        plot_overlay(batch["image"][i], mask, heat, Path(out_dir) / f"grounding_{done:03d}.png",
                                     f"{pair['category']}: {pair['phrase']}\nCNR {pair['cnr']:.2f}  "
                                     f"mIoU {pair['miou']:.2f}  ({r} readout)")
                    scored[r, c].append(pair)
        skipped += sum(not mask.any() for mask in batch["mask"])
        start += n
    pairs = scored[readout, "true"]
    if not pairs:
        raise ValueError(f"no grounding pair has a box in the {dataset.size}-pixel model frame ({skipped} skipped)")
    other = next(r for r in READOUTS if r != readout)
    swapped_rows = scored[readout, "swapped"]
    return dict(readout=readout, **grounding_summary(pairs), skipped_empty_boxes=int(skipped), pairs=pairs,
                swapped=dict(**grounding_summary(swapped_rows), pairs=swapped_rows,
                             same_image_fraction=float(np.mean([p["swapped_same_image"] for p in swapped_rows]))),
                prior_only=dict(**grounding_summary(scored[readout, "prior_only"]), pairs=scored[readout, "prior_only"]),
                other_readout=dict(readout=other, **{c: dict(**grounding_summary(scored[other, c]), pairs=scored[other, c])
                                                     for c in PHRASES}))


# ----------------------------------------------------------------------------- outputs

def _save_figure(figure: Figure, path) -> None:
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110, bbox_inches="tight"))


def plot_roc(labels, scores, class_names: list[str], path, macro: float, title: str = "Zero-shot ROC") -> None:
    figure = Figure(figsize=(5.5, 5))  # no pyplot: no global backend state (safe inside notebooks)
    axis = figure.subplots()
    for c, name in enumerate(class_names):
        fpr, tpr = roc_curve(labels[:, c], scores[:, c])
        axis.plot(fpr, tpr, lw=1.2, label=f"{name} ({roc_auc(labels[:, c], scores[:, c]):.3f})")
    axis.plot([0, 1], [0, 1], "k:", lw=0.8)
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title} (macro AUC {macro:.3f})")
    axis.legend(fontsize=7, loc="lower right")
    _save_figure(figure, path)


def plot_overlay(image: torch.Tensor, mask, heatmap, path, title: str) -> None:
    """The image with its true box (left) and with the [-1, 1] similarity map on top (right)."""
    figure = Figure(figsize=(7, 3.8))
    axes = figure.subplots(1, 2)
    for axis in axes:
        axis.imshow(to_numpy(image)[0], cmap="gray")
        axis.contour(to_numpy(mask).astype(float), levels=[0.5], colors="lime", linewidths=1.2)
        axis.axis("off")
    shown = axes[1].imshow(to_numpy(heatmap), cmap="jet", alpha=0.45, vmin=-1, vmax=1)
    figure.colorbar(shown, ax=list(axes), fraction=0.025)  # shrinks both panels alike
    figure.suptitle(title, fontsize=8)
    _save_figure(figure, path)


# ----------------------------------------------------------------------------- command line

@dataclass
class EvalConfig:
    ckpt: str = option("", "checkpoint written by train.py, or the released maco.pth (required)")
    tokenizer: str = option("", "tokenizers JSON file for released weights (the released mimic_wordpiece.json); a "
                                "train.py checkpoint carries its own")
    data: str = option("synthetic", "evaluation set", choices=eval_datasets.DATASETS)
    root: str = option("data/synthetic", "dataset folder: synthetic world, NIH (Data_Entry CSV, split list, images "
                                         "below it), RSNA (stage_2_train_labels.csv), SIIM (train-rle.csv and images "
                                         "below it), CheXpert (valid.csv/train.csv), MS-CXR (its CSV)")
    mimic_root: str = option("", "ms-cxr: MIMIC-CXR-JPG folder that holds files/")
    split_file: str = option("", "split list, relative to --root or absolute ('' = NIH test_list.txt; RSNA and SIIM: "
                                 "every labelled image; pass MaCo's DatasetsSplits/*/test_list.txt to reproduce its "
                                 "test sets)")
    image_dir: str = option("", "nih: the folder of the images, relative to --root or absolute ('' = find each listed "
                                "image below --root: images/, Kaggle's images_001/images/ ... images_012/images/, "
                                "images/images_all/ or flat)")
    split: str = option("", "synthetic: test (default) | validate | train; chexpert: valid (default) | train")
    uncertain: str = option("maco", "chexpert uncertain (-1.0) labels: maco (U-Ones for atelectasis, edema, effusion; "
                                    "U-Zeros for the others), ones, zeros or ignore",
                            choices=("maco", "ones", "zeros", "ignore"))
    frontal_only: bool = option(True, "chexpert: frontal images only, lateral ones dropped and counted "
                                      "(--no-frontal-only keeps them, as MaCo's split lists do)")
    prompts: str = option("", "prompt set ('' = siim for SIIM, else default)", choices=("", *PROMPT_SETS))
    cosine: bool = option(False, "cosine scoring instead of the released raw dot products")
    out: str = option("out/eval", "output folder for metrics.json and the PNGs")
    batch_size: int = option(32, "images per forward pass", minimum=1)
    workers: int = option(0, "DataLoader worker processes", minimum=0)
    max_images: int = option(0, "evaluate only the first N images / pairs (0 = all)", minimum=0)
    n_boot: int = option(1000, "bootstrap resamples for the macro-AUC 95% interval", minimum=1)
    seed: int = option(0, "bootstrap seed", minimum=0)
    overlays: int = option(8, "grounding overlay PNGs to write", minimum=0)
    readout: str = option(READOUTS[0], "grounding readout of the headline rows: prior (released: patch embeddings "
                                       "weighted by softmax(w / 0.02), raw dot product) or cosine (each patch "
                                       "embedding's cosine with the phrase, no prior); both are measured and printed",
                          choices=READOUTS)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")
    precision: str = option("auto", "bf16 autocast or fp32 for the model's forward passes (auto: bf16 on GPUs and "
                                    "CPUs with native bf16, see docs/speed.md); scores are float32 either way",
                            choices=PRECISIONS)
    progress_interval: float = progress_interval_option()

    def __post_init__(self):
        check_options(self)


def run_evaluation(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    """Evaluate a checkpoint (or an in-memory model and tokenizer) on cfg.data; writes metrics.json and PNGs to cfg.out."""
    device = pick_device(cfg.device)
    check_writable(cfg.out, "--out")
    if model is None:
        if not Path(cfg.ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {cfg.ckpt!r} not found (pass --ckpt, a file written by train.py "
                                    f"or the released maco.pth)")
        model, tokenizer = load(cfg.ckpt, cfg.tokenizer or None, device)
    model = model.to(device).eval()
    zero_shot, grounding = eval_datasets.load_benchmark(
        cfg.data, cfg.root, model.cfg.img_size, model.cfg.in_chans, split_file=cfg.split_file, split=cfg.split,
        uncertain=cfg.uncertain, mimic_root=cfg.mimic_root, limit=cfg.max_images or None, image_dir=cfg.image_dir,
        frontal_only=cfg.frontal_only)
    precision = resolve_precision(cfg.precision, device)
    results = dict(data=cfg.data, root=str(cfg.root), checkpoint=cfg.ckpt, precision=precision,
                   config=dataclasses.asdict(cfg))
    with autocast(device, precision), lines_every(cfg.progress_interval):
        if zero_shot is not None:
            dataset, class_names, prompt_set = zero_shot
            prompt_set = cfg.prompts or prompt_set
            results["zero_shot"] = evaluate_zero_shot(model, tokenizer, dataset, class_names, prompt_set, cfg.cosine,
                                                      cfg.batch_size, cfg.workers, cfg.n_boot, cfg.seed, cfg.out)
        if grounding is not None:
            results["grounding"] = evaluate_grounding(model, tokenizer, grounding, cfg.batch_size, cfg.workers,
                                                      cfg.out, cfg.overlays, cfg.readout)
    write_json(results, Path(cfg.out) / "metrics.json")
    return results


def format_results(results: dict) -> str:
    lines = []
    if "zero_shot" in results:
        zs = results["zero_shot"]
        lines.append(f"{'class':<28}{'AUC':>7}{'F1':>7}{'F1(w)':>7}{'acc':>7}{'pos':>6}{'neg':>6}")
        for name, m in zs["per_class"].items():
            lines.append(f"{name:<28}{m['auc']:>7.3f}{m['f1']:>7.3f}{m['f1_support_weighted']:>7.3f}"
                         f"{m['accuracy']:>7.3f}{m['n_pos']:>6}{m['n_neg']:>6}")
        low, high = zs["macro_auc_ci95"]
        lines.append(f"{'macro':<28}{zs['macro_auc']:>7.3f}{zs['macro_f1']:>7.3f}{zs['macro_f1_support_weighted']:>7.3f}"
                     f"{zs['macro_accuracy']:>7.3f}   AUC 95% CI [{low:.3f}, {high:.3f}], {zs['n_images']} images")
    if "grounding" in results:
        gr = results["grounding"]
        lines.append(f"\n{'grounding category':<28}{'n':>5}{'CNR':>8}{'|CNR|':>8}{'mIoU':>8}{'point':>8}")
        rows = [*gr["per_category"].items(), ("mean over categories", gr["category_mean"]), ("mean over pairs", gr["overall"])]
        for name, m in rows:
            count = m.get("n_pairs", gr["n_pairs"] if name == "mean over pairs" else "")
            lines.append(f"{name:<28}{count:>5}{m['cnr']:>8.3f}{m['abs_cnr']:>8.3f}{m['miou']:>8.3f}{m['pointing_game']:>8.3f}")
        if "swapped" in gr:
            lines.append(phrase_specificity_table(gr))
    return "\n".join(lines)


def phrase_specificity_table(grounding: dict) -> str:
    """The mean over pairs with its own phrase, another finding's phrase and the empty phrase, for each readout."""
    names = {"prior": "prior-weighted dot product (released)", "cosine": "cosine, no prior"}
    labels = {"true": "its own phrase", "swapped": "another finding's phrase", "prior_only": "empty phrase (prior only)"}
    groups = [(grounding["readout"], {c: (grounding if c == "true" else grounding[c])["overall"] for c in PHRASES})]
    if "other_readout" in grounding:
        other = grounding["other_readout"]
        groups.append((other["readout"], {c: other[c]["overall"] for c in PHRASES}))
    lines = [f"\n{'phrase specificity (mean over pairs)':<38}{'CNR':>8}{'mIoU':>8}{'point':>8}"]
    for number, (readout, rows) in enumerate(groups):
        lines.append(f"readout {readout}: {names[readout]}" + (" (the rows above)" if number == 0 else ""))
        for c in PHRASES:
            m = rows[c]
            lines.append(f"  {labels[c]:<36}{m['cnr']:>8.3f}{m['miou']:>8.3f}{m['pointing_game']:>8.3f}")
    return "\n".join(lines)


def evaluate_command(cfg: EvalConfig) -> None:
    print(describe_precision(cfg.precision, pick_device(cfg.device)))
    results = run_evaluation(cfg)
    print(format_results(results))
    print(f"\nwrote {Path(cfg.out) / 'metrics.json'} and the plots beside it")


def main(argv=None) -> int:
    return run_script(EvalConfig, evaluate_command, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
