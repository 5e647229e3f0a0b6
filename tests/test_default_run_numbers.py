"""One source for the default run's numbers (issue 30): every number the README, the docs and the notebooks' prose
quote about the default run (runs/maco) equals docs/default_run_results.json, which `python -m tools.render_notebooks`
writes from that run, at the precision the page prints it with. A number typed by hand from another run fails here.

Each quote is a pattern with one group per number and the result it must equal (a path into the results file, or
a function of it); a pattern that no longer matches fails too, so a reworded sentence is re-checked, not skipped.
"""
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = json.loads((ROOT / "docs/default_run_results.json").read_text())


def at(path: str):
    """The results file's value at a dotted path ('zero_shot.auc.edema', 'zero_shot.macro_auc_ci95.0')."""
    def value(results):
        for key in path.split("."):
            results = results[int(key)] if isinstance(results, list) else results[key]
        return results
    return value


def own_minus_swapped(readout):
    return lambda r: r["grounding"][readout]["own"]["pointing"] - r["grounding"][readout]["swapped"]["pointing"]


POINTING = [at(f"grounding.prior.{phrase}.pointing") for phrase in ("own", "swapped", "empty")]
MACRO = [at("zero_shot.macro_auc"), at("zero_shot.macro_auc_ci95.0"), at("zero_shot.macro_auc_ci95.1")]
N = r"(-?\d+\.\d+)"  # a quoted number; its decimals set the rounding it is compared at
QUOTES = [  # (page, pattern, what each group must equal)
    ("README.md", rf"macro\s+{N}\s+\.\.\.\s+AUC 95% CI \[{N}, {N}\], (\d+) images", [*MACRO, at("zero_shot.n_images")]),
    *[("README.md", rf"{row}\s+{N}\s+{N}\s+{N}\b", [at(f"grounding.prior.{phrase}.{m}") for m in ("cnr", "miou", "pointing")])
      for row, phrase in (("its own phrase", "own"), ("another finding's phrase", "swapped"),
                          (r"empty phrase \(prior only\)", "empty"))],
    ("README.md", rf"\(cardiomegaly {N}, edema {N}\)", [at("zero_shot.auc.cardiomegaly"), at("zero_shot.auc.edema")]),
    ("README.md", rf"another finding's phrase: {N} in pointing", [own_minus_swapped("prior")]),
    ("README.md", rf"(\d+,\d+) steps, (\d+) s of training by the\s+run's log, a median {N} steps/s",
     [at("training.steps"), at("training.seconds_from_log"), at("training.steps_per_s_median")]),
    ("docs/default-run.md", rf"bf16 run\s+of this command .*?: macro AUC {N} \[{N}, {N}\] over (\d+)\s+images; pointing "
                            rf"{N} / {N} / {N}", [*MACRO, at("zero_shot.n_images"), *POINTING]),
    ("docs/default-run.md", rf"\(prior readout\) \| {N} / {N} / {N} \| the words move the map a little \(own minus "
                            rf"another's: {N}\)", [*POINTING, own_minus_swapped("prior")]),
    ("docs/default-run.md", rf"cosine readout \(no prior\) \| {N} / {N} / {N} \|.*?edema \({N} against {N} swapped\) "
                            rf"and pneumothorax \({N} against {N}\)",
     [*(at(f"grounding.cosine.{phrase}.pointing") for phrase in ("own", "swapped", "empty")),
      at("grounding.cosine_pointing_per_category.Edema.own"), at("grounding.cosine_pointing_per_category.Edema.swapped"),
      at("grounding.cosine_pointing_per_category.Pneumothorax.own"),
      at("grounding.cosine_pointing_per_category.Pneumothorax.swapped")]),
    ("docs/default-run.md", rf"\(cardiomegaly {N}, edema {N}; nodule, mass, atelectasis {N}-{N}\)",
     [at("zero_shot.auc.cardiomegaly"), at("zero_shot.auc.edema"),
      lambda r: min(r["zero_shot"]["auc"][c] for c in ("nodule", "mass", "atelectasis")),
      lambda r: max(r["zero_shot"]["auc"][c] for c in ("nodule", "mass", "atelectasis"))]),
    ("docs/default-run.md", rf"effective number of patches \| {N} of (\d+)",
     [at("correlation_head.prior_effective_patches"), at("correlation_head.patches")]),
    ("docs/alignment.md", rf"bf16 run, docs/default_run_results.json: pointing {N} with\s+a pair's own phrase, {N} with "
                          rf"another finding's, {N} with none", POINTING),
    ("docs/alignment.md", rf"AUC {N} \[{N}, {N}\] there", MACRO),
    ("docs/ablation.md", rf"now is a\s+bf16 run, zero-shot {N}", [at("zero_shot.macro_auc")]),
    ("docs/finetuning.md", rf"checkpoint's zero-shot macro AUC \({N}\)", [at("zero_shot.macro_auc")]),
    ("docs/claims.md", rf"macro AUC {N} \[{N}, {N}\] over (\d+) test images", [*MACRO, at("zero_shot.n_images")]),
    ("docs/claims.md", rf"cardiomegaly {N} and edema {N}", [at("zero_shot.auc.cardiomegaly"), at("zero_shot.auc.edema")]),
    ("docs/claims.md", rf"pointing {N} with a pair's own phrase, {N} with another finding's and {N} with the empty",
     POINTING),
    ("docs/claims.md", rf"the pairs' weights at the last logged step: mean {N}, standard deviation {N}",
     [at("last_log_line.correlation_weight_mean"), at("last_log_line.correlation_weight_std")]),
    ("notebooks/01_masking_and_reconstruction.ipynb", rf"from about 2\.0 to {N} within the 8", [at("last_log_line.loss_rec")]),
    ("notebooks/02_correlation_weighted_loss.ipynb", rf"pointing {N} with a pair's own phrase, {N} with another "
                                                     rf"finding's and\s+{N} with the empty phrase", POINTING),
    ("notebooks/03_zero_shot_classification.ipynb", rf"score cardiomegaly {N}\s+and edema {N}, .*? stay near {N} to {N}",
     [at("zero_shot.auc.cardiomegaly"), at("zero_shot.auc.edema"),
      lambda r: min(r["zero_shot"]["auc"][c] for c in ("nodule", "mass", "atelectasis")),
      lambda r: max(r["zero_shot"]["auc"][c] for c in ("nodule", "mass", "atelectasis"))]),
    ("notebooks/04_phrase_grounding.ipynb", rf"pointing\s+{N} against {N} in the run's own evaluation", POINTING[:2]),
    ("notebooks/04_phrase_grounding.ipynb", rf"\(pointing\s+{N} with its own phrase, {N} with another's\)",
     [at("grounding.cosine_pointing_per_category.Edema.own"), at("grounding.cosine_pointing_per_category.Edema.swapped")]),
]


def page_text(page: str) -> str:
    """A page's text, its line breaks and runs of spaces as one space; of a notebook, its markdown cells (its code
    and outputs are checked by tests/test_notebooks.py)."""
    if page.endswith(".ipynb"):
        notebook = nbformat.read(ROOT / page, as_version=4)
        text = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    else:
        text = (ROOT / page).read_text()
    return re.sub(r"\s+", " ", text)


def agrees(quoted: str, value) -> bool:
    """A quoted number equals `value` at the quote's own precision ('1,272' and '488' are integers)."""
    decimals = len(quoted.split(".")[1]) if "." in quoted else 0
    return float(quoted.replace(",", "")) == round(float(value), decimals)


@pytest.mark.parametrize("page, pattern, values", QUOTES, ids=[f"{page}:{i}" for i, (page, _, _) in enumerate(QUOTES)])
def test_every_quoted_default_run_number_equals_the_results_file(page, pattern, values):
    matches = list(re.finditer(pattern, page_text(page), re.DOTALL))
    assert matches, f"{page}: the sentence quoting the default run no longer matches {pattern!r}"
    for match in matches:
        for quoted, value in zip(match.groups(), values):
            expected = value(RESULTS)
            assert agrees(quoted, expected), f"{page}: {quoted} in {match.group(0)!r}, the default run gives {expected}"


def test_the_agreement_rule_fails_on_a_changed_number():
    assert agrees("0.709", 0.7087) and agrees("1,272", 1272) and agrees("488", 487.55)
    assert not agrees("0.715", 0.7087) and not agrees("0.70", 0.7087) and not agrees("336", 487.55)


def test_the_results_file_is_what_the_renderer_computes(tmp_path):
    """default_run_results on a small run folder: the numbers come from the files, not from anywhere else."""
    from tools.render_notebooks import default_run_results

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    w = torch.zeros(1, 4)
    w[0, 2] = 0.02 * torch.log(torch.tensor(3.0))  # softmax(w / 0.02) = (1, 1, 3, 1) / 6
    torch.save({"train_config": {"preset": "tiny", "precision": "fp32", "seed": 0, "epochs": 1, "batch_size": 4},
                "model": {"correlation_head.weight": w}, "step": 20, "steps_per_epoch": 20}, run / "checkpoint.pt")
    log = [{"step": 10, "images_per_s": 20.0}, {"step": 20, "images_per_s": 40.0}]
    for row in log:
        row.update(loss=1.0, loss_rec=0.5, loss_con=1.5, logit_scale=33.3, correlation_weight_mean=0.9,
                   correlation_weight_std=0.1)
    (run / "log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
    group = {"overall": {"cnr": 0.5, "miou": 0.1, "pointing_game": 0.25},
             "per_category": {"Edema": {"pointing_game": 0.5}}}
    (run / "eval/metrics.json").write_text(json.dumps({
        "zero_shot": {"n_images": 10, "macro_auc": 0.7, "macro_auc_ci95": [0.6, 0.8],
                      "per_class": {"edema": {"auc": 0.9}}},
        "grounding": {"n_pairs": 5, **group, "swapped": group, "prior_only": group,
                      "other_readout": {"true": group, "swapped": group, "prior_only": group}}}))
    results = default_run_results(run)
    assert results["training"]["seconds_from_log"] == pytest.approx(10 * 4 / 20 + 10 * 4 / 40)
    assert results["training"]["steps"] == 20 and results["training"]["precision"] == "fp32"
    assert results["zero_shot"]["auc"] == {"edema": 0.9}
    assert results["grounding"]["prior"]["own"]["pointing"] == 0.25
    assert results["correlation_head"]["prior_effective_patches"] == pytest.approx(36 / 12)  # 1 / sum(alpha^2)
