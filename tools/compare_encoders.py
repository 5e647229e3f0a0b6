"""What does one encoder give over another in fine-tuning, segmentation and detection? Paired differences over the
same test images, pooled over fine-tuning seeds, from the runs that finetune.py, segment.py and detect.py wrote.

    python finetune.py --seed 1 --out-dir runs/finetune-seed1       # (and segment.py, detect.py) a second seed
    python -m tools.compare_encoders --task segment --runs runs/segment,runs/segment-seed1
    python -m tools.compare_encoders --task detect --runs clip=runs/dense/clip,maco=runs/dense/maco --compare maco:clip

--runs lists --out-dirs (one seed's runs each), each optionally with `name=` in front: every run in it is then
named `name` instead of its encoder's (maco, scratch, ...). For each label fraction and each --compare pair A:B,
the difference A - B of each metric, the mean over the seeds both have, with a 95% percentile bootstrap interval:
the test images resampled with replacement, the same resample for both encoders and every seed (the test split is
the same), so the interval is of the difference itself. Each run's per-image test outputs (test_outputs.npz beside
its best.pt) hold everything needed; nothing is retrained. Writes --out (JSON) and prints a table.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from util.checkpoint import read_arrays, read_json, write_json
from util.cli import option, run_script
from util.metrics import ap_summary, dice_scores, macro_auc, matched_images, percentile_interval

METRICS = {"finetune": ("macro_auc",), "segment": ("pooled_dice", "positive_dice", "med_dice"),
           "detect": ("ap", "ap50")}


@dataclass
class CompareConfig:
    runs: str = option("", "comma-separated --out-dirs of the script, one per seed; `name=dir` names every run in dir")
    task: str = option("segment", "which script wrote the runs", choices=tuple(METRICS))
    compare: str = option("maco:scratch", "comma-separated pairs A:B of encoder names: the difference A - B")
    mode: str = option("finetune", "finetune.py runs: which mode's runs (finetune or linear-probe)",
                       choices=("finetune", "linear-probe"))
    n_boot: int = option(1000, "bootstrap resamples of the test images", minimum=1)
    seed: int = option(0, "seed of the bootstrap", minimum=0)
    out: str = option("", "also write the results here (JSON)")


def collect(out_dirs: list[str], task: str, mode: str) -> dict:
    """{(name, label fraction): {seed: per-image test outputs}} of every run in the given out-dirs."""
    runs = {}
    for spec in out_dirs:
        name, _, folder = spec.rpartition("=")
        summary_path = Path(folder) / "metrics.json"
        if not summary_path.is_file():
            raise FileNotFoundError(f"{summary_path}: no metrics.json; run the script with --out-dir {folder} first")
        summary = read_json(summary_path)
        seed = summary["config"]["seed"]
        for run in summary["runs"]:
            if task == "finetune" and run["mode"] != mode:
                continue
            outputs = Path(run["weights"]).parent / "test_outputs.npz"
            if not outputs.is_file():
                raise FileNotFoundError(f"{outputs}: no per-image test outputs (runs written before they were saved); "
                                        f"run the script again")
            key = (name or run["init"], run["label_fraction"])
            if seed in runs.setdefault(key, {}):
                raise ValueError(f"two runs of {key[0]} at {100 * key[1]:g}% with seed {seed}: give each out-dir "
                                 f"its own name= or seed")
            runs[key][seed] = read_arrays(outputs)
    return runs


def scorer(task: str, outputs: dict):
    """metric values {name: value} of one run on any resample `chosen` (indices of test images)."""
    if task == "finetune":
        return lambda chosen: dict(macro_auc=macro_auc(outputs["labels"][chosen], outputs["scores"][chosen]))
    if task == "segment":
        return lambda chosen: dice_scores(outputs["counts"][chosen])
    n = int(outputs["n_images"])
    predictions = [(outputs["boxes"][outputs["box_image"] == i], outputs["scores"][outputs["box_image"] == i])
                   for i in range(n)]
    per_image = matched_images(predictions, [outputs["truths"][outputs["truth_image"] == i] for i in range(n)])
    return lambda chosen: ap_summary(per_image, chosen)


def n_images(task: str, outputs: dict) -> int:
    return int(outputs["n_images"]) if task == "detect" else len(outputs["counts" if task == "segment" else "labels"])


def compare(runs: dict, a: str, b: str, task: str, n_boot: int, seed: int) -> list[dict]:
    """One row per label fraction both encoders ran at: each metric's A, B and A - B (mean over the shared seeds)
    with the bootstrap interval of the difference."""
    rows = []
    for fraction in sorted({f for name, f in runs if name == a} & {f for name, f in runs if name == b}):
        seeds = sorted(set(runs[(a, fraction)]) & set(runs[(b, fraction)]))
        if not seeds:
            continue
        scorers = [(scorer(task, runs[(a, fraction)][s]), scorer(task, runs[(b, fraction)][s])) for s in seeds]
        n = n_images(task, runs[(a, fraction)][seeds[0]])
        everything = np.arange(n)
        full = [(score_a(everything), score_b(everything)) for score_a, score_b in scorers]
        rng = np.random.default_rng(seed)
        boot = {metric: [] for metric in METRICS[task]}
        for _ in range(n_boot):
            chosen = rng.integers(0, n, n)
            pairs = [(score_a(chosen), score_b(chosen)) for score_a, score_b in scorers]
            for metric in boot:
                boot[metric].append(np.mean([x[metric] - y[metric] for x, y in pairs]))
        row = dict(fraction=fraction, seeds=seeds, a=a, b=b, n_images=n)
        for metric, values in boot.items():
            row[metric] = dict(a=float(np.mean([x[metric] for x, _ in full])),
                               b=float(np.mean([y[metric] for _, y in full])),
                               difference=float(np.mean([x[metric] - y[metric] for x, y in full])),
                               ci95=percentile_interval(values),
                               per_seed=[float(x[metric] - y[metric]) for x, y in full])
        rows.append(row)
    return rows


def table(rows: list[dict], task: str) -> str:
    lines = [f"{'pair':<22}{'fraction':>9}{'seeds':>7}  " + "".join(f"{m + ' A / B / A - B [95% CI]':>44}"
                                                                 for m in METRICS[task])]
    for row in rows:
        cells = []
        for metric in METRICS[task]:
            value = row[metric]
            low, high = value["ci95"]
            cells.append(f"{100 * value['a']:.1f} / {100 * value['b']:.1f} / {100 * value['difference']:+.1f} "
                         f"[{100 * low:+.1f}, {100 * high:+.1f}]".rjust(44))
        lines.append(f"{row['a'] + ' - ' + row['b']:<22}{100 * row['fraction']:>8g}%{len(row['seeds']):>7}  "
                     + "".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    def body(cfg: CompareConfig) -> None:
        out_dirs = [spec.strip() for spec in cfg.runs.split(",") if spec.strip()]
        if not out_dirs:
            raise ValueError("--runs: name at least one --out-dir of finetune.py, segment.py or detect.py")
        runs = collect(out_dirs, cfg.task, cfg.mode)
        results, names = {}, sorted({name for name, _ in runs})
        for pair in cfg.compare.split(","):
            a, _, b = pair.partition(":")
            if a not in names or b not in names:
                raise ValueError(f"--compare {pair}: the runs have the encoders {', '.join(names)}")
            results[pair] = compare(runs, a, b, cfg.task, cfg.n_boot, cfg.seed)
            print(table(results[pair], cfg.task))
        if cfg.out:
            write_json(dict(task=cfg.task, runs=out_dirs, pairs=results), cfg.out)
    return run_script(CompareConfig, body, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
