"""Why does a MaCo checkpoint ground (or not)? Six diagnostics a student can run on any checkpoint (docs/method.md §9).

    python -m tools.diagnostics --ckpt runs/maco/checkpoint.pt            # the synthetic test split (data/synthetic)
    python -m tools.diagnostics --ckpt runs/maco/checkpoint.pt --out runs/maco/diagnostics.json
    python -m tools.diagnostics --ckpt runs/maco/checkpoint.pt --figure docs/grounding_example.png  # own / swapped / empty maps

1. Text: do the findings get distinct text embeddings? Cosine matrix of one report sentence per finding
   (the first grounding phrase of each category in the test split) and of the zero-shot prompts "There is {c}. ".
2. Alignment: are the patch embeddings inside a finding's box closer (cosine) to that finding's phrase than the
   patches outside it, and closer to it than to another finding's phrase? Run it on checkpoints taken during
   training to see whether (and when) the patches move toward their phrase.
3. The correlation head's spatial prior alpha = softmax(w / 0.02): how many of the N patches does it
   effectively cover (exp of its entropy, and 1 / sum alpha^2)? A prior on one patch makes the released
   grounding map a picture of the prior, whatever the phrase.
4. Probe: can a linear map of the frozen patch tokens tell the patches of a finding's box from the others?
   Ridge regression per category, fitted on half the test images and scored (patch AUC) on the other half,
   against the same probe on patch positions alone (where a finding usually is) as the baseline.
5. Geometry: how many directions do the image embeddings use (mean pairwise cosine, variance share of the top
   principal components, effective rank), and does each class get its own zero-shot direction e+ - e-, or do
   all 8 classes score the images along one shared "abnormal" axis (class scores correlated near 1)?
6. Words alone: what does a map score that knows only the phrase's finding and where boxes of that finding
   usually are (their frequency over the other half of the test images), never looking at the image? And with
   another finding's category (the swapped phrase)? The scale against which a model's grounding is read.
"""
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from data import check_root
from eval_zeroshot import (
    READOUTS,
    class_embeddings,
    class_prompts,
    embed_texts,
    grounding_caption,
    scale_to_unit_range,
    similarity_map,
    swapped_phrases,
)
from maco import load
from util import eval_datasets
from util.checkpoint import check_writable, write_atomic, write_json
from util.cli import check_options, option, run_script
from util.devices import pick_device
from util.metrics import cnr, miou, pointing_game, roc_auc


def finding_sentences(pairs) -> dict[str, str]:
    """{category: the first phrase of that category} over grounding pairs sorted by (path, phrase): deterministic."""
    sentences = {}
    for pair in sorted(pairs, key=lambda p: (str(p.path), p.phrase)):
        sentences.setdefault(pair.category, pair.phrase)
    return dict(sorted(sentences.items()))


def _off_diagonal_mean(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * n - n))


@torch.no_grad()
def text_similarity(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Cosine matrix (C, C) of the text embeddings of `texts`."""
    embeddings = F.normalize(embed_texts(model, tokenizer, texts).float(), dim=-1)
    return (embeddings @ embeddings.T).cpu()


def prior_coverage(model, temperature: float = 0.02) -> dict:
    """Effective number of patches of alpha = softmax(w / temperature): exp(entropy) and 1 / sum(alpha^2)."""
    alpha = model.spatial_prior(temperature).detach().double().cpu()  # (N,)
    entropy = -(alpha * alpha.clamp_min(1e-300).log()).sum()
    return dict(num_patches=alpha.numel(), exp_entropy=float(entropy.exp()), inverse_simpson=float(1 / (alpha ** 2).sum()),
                max_alpha=float(alpha.max()), w_std=float(model.correlation_head.weight.std()))


def patch_box_fraction(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """(S, S) bool box mask -> (grid * grid,) fraction of each patch's pixels inside the box, row-major."""
    return F.adaptive_avg_pool2d(mask[None, None].float(), grid).flatten()


@torch.no_grad()
def _encode_pairs(model, dataset, batch_size: int = 64):
    """Per grounding pair: encoder tokens h (N, D), projected patch embeddings (N, E), box fraction per patch (N,).
    MaCo.encode_image's projection, keeping the tokens before it too (the ridge probe reads them)."""
    device = next(model.parameters()).device
    grid = model.cfg.grid_size
    tokens, patches, inside = [], [], []
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        h, _, _ = model.image_encoder(batch["image"].to(device), mask_ratio=0.0)  # (B, 1 + N, D)
        tokens.append(h[:, 1:].float().cpu())
        patches.append(model.image_proj(h[:, 1:]).float().cpu())
        inside.append(torch.stack([patch_box_fraction(m, grid) for m in batch["mask"]]))
    return torch.cat(tokens), torch.cat(patches), torch.cat(inside)


@torch.no_grad()
def patch_phrase_alignment(patch_emb, inside, phrase_emb, other_emb, categories) -> dict:
    """How much closer (cosine) are the patches inside a pair's box to its phrase than those outside, and than to
    another finding's phrase? patch_emb (P, N, E), inside (P, N) box fractions, phrase_emb / other_emb (P, E)."""
    patches = F.normalize(patch_emb, dim=-1)
    cos_true = torch.einsum("pne,pe->pn", patches, F.normalize(phrase_emb, dim=-1))  # (P, N)
    cos_other = torch.einsum("pne,pe->pn", patches, F.normalize(other_emb, dim=-1))
    box, rest = inside > 0, inside == 0
    keep = box.any(1) & rest.any(1)

    def region_mean(values, region):
        return (values * region).sum(1) / region.sum(1).clamp_min(1)

    # margin: inside minus outside, per pair; specificity: the same margin with the true phrase minus another's
    margin_true = region_mean(cos_true, box) - region_mean(cos_true, rest)
    margin_other = region_mean(cos_other, box) - region_mean(cos_other, rest)
    per_category = {}
    for category in sorted(set(categories)):
        member = torch.tensor([c == category for c in categories]) & keep
        per_category[category] = dict(margin_true=float(margin_true[member].mean()),
                                      margin_other=float(margin_other[member].mean()))
    return dict(n_pairs=int(keep.sum()), margin_true=float(margin_true[keep].mean()),
                margin_other=float(margin_other[keep].mean()),
                cos_inside_true=float(region_mean(cos_true, box)[keep].mean()),
                cos_outside_true=float(region_mean(cos_true, rest)[keep].mean()), per_category=per_category)


def _ridge_scores(train_x, train_y, test_x, ridge: float) -> np.ndarray:
    """Closed-form ridge regression with a bias, on standardised features: scores of test_x."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mean) / std, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mean) / std, np.ones((len(test_x), 1))])
    weights = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ train_y)
    return b @ weights


def ridge_patch_probe(tokens, inside_by_category: dict, ridge: float = 10.0) -> dict:
    """Ridge-regression probe per category on frozen patch tokens (I, N, D) -> is this patch in a box of the category?
    inside_by_category: {category: (I, N) box fractions on each test image, 0 where the image lacks it}.
    Fitted on even images, scored on odd ones, as a patch AUC over all patches ("all": where *and* whether) and
    over the patches of the images that have the finding only ("where": inside vs outside its box). Features:
    the tokens with a one-hot position, against the one-hot position alone (where the finding usually is)."""
    images, num_patches, _ = tokens.shape
    train, test = np.arange(0, images, 2), np.arange(1, images, 2)
    position = np.tile(np.eye(num_patches), (images, 1, 1))  # (I, N, N) one-hot patch position
    features = {"position": position, "tokens": np.concatenate([tokens.double().numpy(), position], -1)}
    result = {}
    for category, inside in inside_by_category.items():
        labels = (inside.numpy() > 0).astype(np.float64)  # (I, N)
        if labels[test].sum() == 0 or labels[train].sum() == 0:
            continue
        present = test[labels[test].any(1)]
        row = {"positive_patches": int(labels.sum())}
        for name, x in features.items():
            width = x.shape[-1]
            weights_scores = _ridge_scores(x[train].reshape(-1, width), labels[train].reshape(-1),
                                           x.reshape(-1, width), ridge).reshape(images, num_patches)
            row[f"{name}_all"] = roc_auc(labels[test].reshape(-1), weights_scores[test].reshape(-1))
            row[f"{name}_where"] = roc_auc(labels[present].reshape(-1), weights_scores[present].reshape(-1))
        result[category] = row
    return result


@torch.no_grad()
def embedding_geometry(model, tokenizer, root, batch_size: int = 64) -> dict:
    """How many directions do the image embeddings use, and do the classes get their own zero-shot direction?

    Over the test split's images: the mean pairwise cosine of the image embeddings (near 1: collapsed onto one
    direction), the share of variance of the top principal components of the normalised, centred embeddings,
    and their effective rank (sum lambda)^2 / sum lambda^2. Over the 8 classes: the mean cosine between the
    zero-shot directions e+ - e- (eval_zeroshot, released prompts) and the mean correlation across images of
    the classes' zero-shot scores. Near 1 for both: one "abnormal" axis scores every class alike."""
    device = next(model.parameters()).device
    class_names = eval_datasets.synthetic_class_names(root)
    items = eval_datasets.load_synthetic(root, class_names, "test")
    dataset = eval_datasets.ClassificationDataset(items, model.cfg.img_size, model.cfg.in_chans)
    image_emb = torch.cat([model.encode_image(x.to(device))[1].float().cpu()
                           for x, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size)])  # (I, E)
    unit = F.normalize(image_emb, dim=-1)
    variances = torch.linalg.svdvals(unit - unit.mean(0)) ** 2
    positive, negative = class_embeddings(model, tokenizer, class_prompts(class_names))
    directions = F.normalize((positive - negative).float().cpu(), dim=-1)  # (C, E)
    scores = (image_emb @ (positive - negative).float().cpu().T).numpy()  # (I, C)
    return dict(image_mean_cosine=_off_diagonal_mean(unit @ unit.T),
                top_pc_share=(variances[:4] / variances.sum()).tolist(),
                effective_rank=float(variances.sum() ** 2 / (variances ** 2).sum()),
                class_direction_mean_cosine=_off_diagonal_mean(directions @ directions.T),
                class_score_mean_correlation=_off_diagonal_mean(torch.from_numpy(np.corrcoef(scores.T))))


def location_reference(pairs, size: int) -> dict:
    """Grounding scores of maps that know the words but not the image: for each pair, the frequency of the boxes
    of its category on the other half of the images (alternate images), in the size x size letterboxed frame,
    scaled to [-1, 1]; `swapped`: the same with the category of the pair's swapped phrase. Means over pairs."""
    masks = [torch.from_numpy(eval_datasets.boxes_to_mask(p.boxes, p.width, p.height, size)) for p in pairs]
    image_order = {path: number for number, path in enumerate(dict.fromkeys(p.path for p in pairs))}
    half = [image_order[p.path] % 2 for p in pairs]  # alternate images: a pair never sees its own image's boxes
    frequency = {}
    for category in {p.category for p in pairs}:
        for h in (0, 1):
            members = [m.double() for m, p, hh in zip(masks, pairs, half) if p.category == category and hh == h]
            frequency[category, h] = torch.stack(members).mean(0) if members else torch.zeros(size, size)
    category_of = {p.phrase: p.category for p in pairs}
    swapped = [category_of.get(phrase, p.category) for phrase, p in zip(swapped_phrases(pairs)[0], pairs)]
    # a tiny ramp breaks the ties of a flat frequency map deterministically (the pointing game takes one argmax)
    ramp = torch.linspace(0, 1e-9, size * size, dtype=torch.float64).view(size, size)

    result = {}
    for name, categories in (("true", [p.category for p in pairs]), ("swapped", swapped)):
        rows = [(cnr(heat, m), miou(heat, m), pointing_game(heat, m))
                for m, c, h in zip(masks, categories, half) if m.any()
                for heat in [scale_to_unit_range((frequency[c, 1 - h] + ramp)[None], tolerance=0.0)[0]]]
        values = np.nanmean(np.array(rows, dtype=np.float64), 0)
        result[name] = dict(zip(("cnr", "miou", "pointing_game"), values.tolist()))
    return result


@torch.no_grad()
def plot_phrase_specificity(model, tokenizer, pairs, path, readout: str = "prior", per_category: int = 1) -> None:
    """A figure (written to `path`): for the first pair(s) of each category, the image with its true box and the
    grounding maps with its own phrase, with the swapped phrase (another finding's) and with the empty phrase."""
    dataset = eval_datasets.GroundingDataset(pairs, model.cfg.img_size, model.cfg.in_chans)
    swapped, _ = swapped_phrases(pairs)
    chosen, seen = [], {}
    for index, pair in enumerate(pairs):
        if seen.get(pair.category, 0) < per_category:
            seen[pair.category] = seen.get(pair.category, 0) + 1
            chosen.append(index)
    chosen.sort(key=lambda index: pairs[index].category)
    rows = [("own", lambda index: pairs[index].phrase), ("swapped", swapped.__getitem__), ("empty", lambda index: "")]
    figure = Figure(figsize=(1.9 * len(chosen), 2.3 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(chosen), squeeze=False)  # a row per phrase kind, a column per pair
    for column, index in enumerate(chosen):
        item = dataset[index]
        for row, (kind, phrase_of) in enumerate(rows):
            phrase = phrase_of(index)
            heat = similarity_map(model, item["image"], phrase, tokenizer, readout=readout)  # (S, S)
            axis = axes[row, column]
            axis.imshow(item["image"][0].numpy(), cmap="gray")
            axis.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=-1, vmax=1)
            axis.contour(item["mask"].float().numpy(), levels=[0.5], colors="lime", linewidths=1.0)
            heading = f"{pairs[index].category}\n" if row == 0 else ""
            axis.set_title(f"{heading}{kind}: {textwrap.shorten(phrase or '(none)', 22, placeholder='...')}\n"
                           f"pointing {pointing_game(heat, item['mask']):.0f}, CNR {cnr(heat, item['mask']):.2f}",
                           fontsize=5.5)
            axis.axis("off")
    figure.suptitle(f"grounding maps ({readout} readout) with the true box (green): each pair with its own phrase, "
                    f"another finding's phrase and the empty phrase", fontsize=8)
    write_atomic(path, lambda temp: figure.savefig(temp, format="png", dpi=110, bbox_inches="tight"))


@torch.no_grad()
def diagnose(model, tokenizer, root, verbose: bool = True) -> dict:
    """Run the six diagnostics on the synthetic test split at `root`; returns a dict (printed if verbose)."""
    model.eval()
    cfg = model.cfg
    pairs = eval_datasets.load_ms_cxr(Path(root) / eval_datasets.MS_CXR_CSV, root)
    sentences = finding_sentences(pairs)
    names = list(sentences)
    sentence_cos = text_similarity(model, tokenizer, [grounding_caption(s) for s in sentences.values()])
    prompt_cos = text_similarity(model, tokenizer, [f"There is {c.lower()}. " for c in names])
    result = dict(finding_sentences=sentences, sentence_cosine=sentence_cos.tolist(),
                  sentence_mean_offdiag=_off_diagonal_mean(sentence_cos), prompt_cosine=prompt_cos.tolist(),
                  prompt_mean_offdiag=_off_diagonal_mean(prompt_cos), prior=prior_coverage(model), embed_dim=cfg.embed_dim)

    dataset = eval_datasets.GroundingDataset(pairs, cfg.img_size, cfg.in_chans)
    tokens, patch_emb, inside = _encode_pairs(model, dataset)
    phrases = [p.phrase for p in pairs]
    categories = [p.category for p in pairs]
    other_phrases, _ = swapped_phrases(pairs)  # another finding's phrase, as evaluate_grounding swaps them
    phrase_emb = embed_texts(model, tokenizer, [grounding_caption(p) for p in phrases]).float().cpu()
    other_emb = embed_texts(model, tokenizer, [grounding_caption(p) for p in other_phrases]).float().cpu()
    result["alignment"] = patch_phrase_alignment(patch_emb, inside, phrase_emb, other_emb, categories)
    result["geometry"] = embedding_geometry(model, tokenizer, root)
    result["location_reference"] = location_reference(pairs, cfg.img_size)

    # probe: one row per test image (its pairs share the image), box fractions per category
    paths = sorted({str(p.path) for p in pairs})
    first_pair = {}
    for index, pair in enumerate(pairs):
        first_pair.setdefault(str(pair.path), index)
    image_tokens = tokens[[first_pair[path] for path in paths]]  # (I, N, D)
    row_of = {path: row for row, path in enumerate(paths)}
    inside_by_category = {c: torch.zeros(len(paths), tokens.shape[1]) for c in names}
    for index, pair in enumerate(pairs):
        inside_by_category[pair.category][row_of[str(pair.path)]] = torch.maximum(
            inside_by_category[pair.category][row_of[str(pair.path)]], inside[index])
    result["probe"] = ridge_patch_probe(image_tokens, inside_by_category)
    if verbose:
        print(format_diagnosis(result))
    return result


def format_diagnosis(result: dict) -> str:
    names = list(result["finding_sentences"])
    lines = ["1. text embeddings: cosine between one sentence per finding "
             f"(mean off-diagonal {result['sentence_mean_offdiag']:.3f}; prompts 'There is {{c}}.': "
             f"{result['prompt_mean_offdiag']:.3f})"]
    lines.append(" " * 22 + "".join(f"{n[:7]:>8}" for n in names))
    for name, row in zip(names, result["sentence_cosine"]):
        lines.append(f"{name[:20]:<22}" + "".join(f"{v:>8.3f}" for v in row))
    a = result["alignment"]
    lines.append(f"2. patch-phrase cosine, inside minus outside the box, over {a['n_pairs']} pairs: true phrase "
                 f"{a['margin_true']:+.4f}, another finding's phrase {a['margin_other']:+.4f} "
                 f"(inside {a['cos_inside_true']:.3f}, outside {a['cos_outside_true']:.3f})")
    for name, m in a["per_category"].items():
        lines.append(f"   {name:<20} true {m['margin_true']:+.4f}  other {m['margin_other']:+.4f}")
    p = result["prior"]
    lines.append(f"3. prior softmax(w/0.02) covers exp(H) = {p['exp_entropy']:.2f} and 1/sum(a^2) = "
                 f"{p['inverse_simpson']:.2f} of {p['num_patches']} patches (max alpha {p['max_alpha']:.3f}, std w {p['w_std']:.4f})")
    lines.append("4. ridge probe on frozen patch tokens (+ one-hot position) against position alone: patch AUC on the odd")
    lines.append("   test images (fitted on the even ones), over all patches and within the images that have the finding")
    lines.append(f"   {'category':<20}{'all: position':>14}{'tokens':>8}{'where: position':>17}{'tokens':>8}{'patches':>9}")
    for name, m in result["probe"].items():
        lines.append(f"   {name:<20}{m['position_all']:>14.3f}{m['tokens_all']:>8.3f}{m['position_where']:>17.3f}"
                     f"{m['tokens_where']:>8.3f}{m['positive_patches']:>9}")
    g = result["geometry"]
    lines.append(f"5. image embeddings (test split): mean pairwise cosine {g['image_mean_cosine']:.3f}; variance share of "
                 f"the top principal components {', '.join(f'{v:.3f}' for v in g['top_pc_share'])}; effective rank "
                 f"{g['effective_rank']:.2f} of {result['embed_dim']}")
    lines.append(f"   zero-shot directions e+ - e- of the 8 classes: mean pairwise cosine {g['class_direction_mean_cosine']:.3f}; "
                 f"mean correlation of the class scores over images {g['class_score_mean_correlation']:.3f}")
    ref = result["location_reference"]
    lines.append("6. words alone (each category's usual box location, never the image): "
                 + "; ".join(f"{label} CNR {ref[k]['cnr']:.3f}, mIoU {ref[k]['miou']:.3f}, pointing {ref[k]['pointing_game']:.3f}"
                             for k, label in (("true", "its own category"), ("swapped", "the swapped phrase's category"))))
    return "\n".join(lines)


@dataclass
class DiagnoseConfig:
    ckpt: str = option("runs/maco/checkpoint.pt", "checkpoint written by train.py")
    root: str = option("data/synthetic", "synthetic world (its test split is used)")
    out: str = option("", "also write the result as JSON to this file ('' = print only)")
    figure: str = option("", "also draw maps with the own, a swapped and the empty phrase, one pair per finding, "
                             "to this PNG (docs/grounding_example.png is drawn so)")
    readout: str = option(READOUTS[0], "grounding readout of the figure", choices=READOUTS)
    device: str = option("auto", "auto | cpu | cuda | cuda:N")

    def __post_init__(self):
        check_options(self)


def diagnose_command(cfg: DiagnoseConfig) -> None:
    for flag, path in (("--out", cfg.out), ("--figure", cfg.figure)):
        if path:
            check_writable(Path(path).parent, flag)
    check_root(cfg.root, "synthetic world")
    if not Path(cfg.ckpt).is_file():
        raise FileNotFoundError(f"checkpoint {cfg.ckpt!r} not found (pass --ckpt, a file written by train.py)")
    model, tokenizer = load(cfg.ckpt, device=pick_device(cfg.device))
    result = diagnose(model, tokenizer, cfg.root)
    if cfg.figure:
        pairs = eval_datasets.load_ms_cxr(Path(cfg.root) / eval_datasets.MS_CXR_CSV, cfg.root)
        plot_phrase_specificity(model, tokenizer, pairs, cfg.figure, cfg.readout)
        print(f"wrote {cfg.figure}")
    if cfg.out:
        write_json(result, cfg.out)
        print(f"wrote {cfg.out}")


def main(argv=None) -> int:
    return run_script(DiagnoseConfig, diagnose_command, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
