"""Render the four notebooks with their outputs from the default run, and write the default run's numbers.

    python -m tools.render_notebooks                  # trains the default run first if runs/maco/checkpoint.pt is missing
    python -m tools.render_notebooks --notebooks 02_correlation_weighted_loss.ipynb

Every notebook in notebooks/ is executed top to bottom against the default run's checkpoint (runs/maco, from
`python train.py`) and the synthetic world it was trained on (data/synthetic), and stored with its outputs. Its
metadata, under "rendered", records what rendered it: the checkpoint, its precision, this CPU, the git commit, and
the sha256 of its code cells (tests/test_notebooks.py fails when a code cell changes without a re-render).

It also writes docs/default_run_results.json: the default run's numbers (zero-shot AUC per class, grounding with the
own, another finding's and the empty phrase, the training log's last line and timing, the correlation head's prior)
from runs/maco/eval/metrics.json, runs/maco/log.jsonl and the checkpoint. The README and docs quote the default run
from this file, and tests/test_default_run_numbers.py checks them against it.
"""
import base64
import io
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from util.checkpoint import read_checkpoint, read_json, read_log, write_atomic, write_json
from util.cli import option, run_script
from util.devices import cpu_bf16_instructions

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = Path("runs/maco")  # the default run, relative to the repository root (as train.py writes it)
RESULTS = Path("docs/default_run_results.json")
PRIOR_TEMPERATURE = 0.02  # the grounding prior's temperature: MaCo.spatial_prior's and similarity_map's default
FIGURE_WIDTH = 1200  # pixels: a stored figure wider than this is scaled down to it
FIGURE_COLOURS = 256  # stored figures are palette PNGs (a radiograph under a heat map compresses 4x better)
READOUTS = {"own": "true", "swapped": "swapped", "empty": "prior_only"}  # results name -> metrics.json group


@dataclass
class RenderConfig:
    notebooks: str = option("", "comma-separated notebook file names in notebooks/ ('' = all of them)")
    timeout: int = option(1200, "seconds one cell may run", minimum=1)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), and its native bf16 instructions."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        name = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                     if line.startswith("model name")), name)
    bf16 = cpu_bf16_instructions()
    return f"{name}, {os.cpu_count()} cores" + (f", {' and '.join(bf16)}" if bf16 else ", no native bf16")


def git_commit() -> dict:
    """HEAD, and whether the working tree had changes (then the outputs are from HEAD plus those changes)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD") or "unknown", "uncommitted_changes": bool(git("status", "--porcelain"))}


def training_seconds(log: list[dict], batch_size: int) -> float:
    """The training time the log implies: each line's images (steps since the previous line x batch) over its
    images_per_s. Checkpoint writes inside a window count; generation, tokenizer and evaluation do not."""
    seconds, previous = 0.0, 0
    for row in log:
        seconds += (row["step"] - previous) * batch_size / row["images_per_s"]
        previous = row["step"]
    return seconds


def grounding_summary(group: dict) -> dict:
    overall = group["overall"]
    return {"cnr": overall["cnr"], "miou": overall["miou"], "pointing": overall["pointing_game"]}


def default_run_results(run_dir: Path) -> dict:
    """The default run's numbers, from its checkpoint, log.jsonl and eval/metrics.json."""
    checkpoint = read_checkpoint(run_dir / "checkpoint.pt")
    metrics = read_json(run_dir / "eval" / "metrics.json")
    log = read_log(run_dir / "log.jsonl")
    cfg = checkpoint["train_config"]
    seconds = training_seconds(log, cfg["batch_size"])
    steps_per_s = sorted(row["images_per_s"] / cfg["batch_size"] for row in log)
    w = checkpoint["model"]["correlation_head.weight"].float().reshape(-1)  # (N,) one weight per patch position
    prior = torch.softmax(w / PRIOR_TEMPERATURE, dim=0)  # as MaCo.spatial_prior
    zero_shot, grounding = metrics["zero_shot"], metrics["grounding"]
    cosine = grounding["other_readout"]
    last = log[-1]
    return {
        "source": {"checkpoint": str(RUN_DIR / "checkpoint.pt"), "metrics": str(RUN_DIR / "eval/metrics.json"),
                   "log": str(RUN_DIR / "log.jsonl"), "command": "python -m tools.render_notebooks"},
        "training": {"preset": cfg["preset"], "precision": cfg["precision"], "seed": cfg["seed"],
                     "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "steps": checkpoint["step"],
                     "steps_per_epoch": checkpoint["steps_per_epoch"], "seconds_from_log": seconds,
                     "steps_per_s_median": steps_per_s[len(steps_per_s) // 2],
                     "steps_per_s_slowest": steps_per_s[0]},
        "last_log_line": {key: last[key] for key in ("step", "loss", "loss_rec", "loss_con", "logit_scale",
                                                     "correlation_weight_mean", "correlation_weight_std")},
        "zero_shot": {"n_images": zero_shot["n_images"], "macro_auc": zero_shot["macro_auc"],
                      "macro_auc_ci95": zero_shot["macro_auc_ci95"],
                      "auc": {name: m["auc"] for name, m in zero_shot["per_class"].items()}},
        "grounding": {
            "n_pairs": grounding["n_pairs"],
            "prior": {name: grounding_summary(grounding if group == "true" else grounding[group])
                      for name, group in READOUTS.items()},
            "cosine": {name: grounding_summary(cosine[group]) for name, group in READOUTS.items()},
            "cosine_pointing_per_category": {
                category: {"own": values["pointing_game"],
                           "swapped": cosine["swapped"]["per_category"][category]["pointing_game"]}
                for category, values in cosine["true"]["per_category"].items()}},
        "correlation_head": {"w_min": w.min().item(), "w_max": w.max().item(), "prior_temperature": PRIOR_TEMPERATURE,
                             "prior_effective_patches": (1 / (prior ** 2).sum()).item(), "patches": w.numel()},
    }


def small_png(encoded: str) -> str:
    """A notebook's base64 PNG output as a 256-colour PNG at most FIGURE_WIDTH pixels wide, base64 again."""
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        picture = image.convert("RGB")
    if picture.width > FIGURE_WIDTH:
        picture = picture.resize((FIGURE_WIDTH, round(picture.height * FIGURE_WIDTH / picture.width)), Image.LANCZOS)
    picture = picture.quantize(FIGURE_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def render(path: Path, rendered: dict, timeout: int, kernels: Path) -> None:
    """Execute the notebook at `path` in place (cwd notebooks/, as in jupyter) and store it with its outputs."""
    import nbformat
    from nbclient import NotebookClient

    from util.notebook import code_cells_hash, kernel_manager

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, km=kernel_manager(kernels), timeout=timeout, startup_timeout=120,
                            record_timing=False, resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                output.data["image/png"] = small_png(output.data["image/png"])
    notebook.metadata["rendered"] = {**rendered, "code_cells_sha256": code_cells_hash(notebook)}
    write_atomic(path, lambda temp: nbformat.write(notebook, temp))


def render_command(cfg: RenderConfig) -> None:
    os.chdir(ROOT)  # the notebooks and train.py resolve runs/ and data/ from the repository root
    checkpoint = RUN_DIR / "checkpoint.pt"
    if not checkpoint.exists():
        print(f"no {checkpoint}: training the default run first (python train.py)")
        subprocess.run([sys.executable, "train.py"], cwd=ROOT, check=True)
    if not Path("data/synthetic/mimic-cxr-2.0.0-metadata.csv.gz").exists():
        raise FileNotFoundError("no data/synthetic, the world the default run was trained on: regenerate it with "
                                "python -m world.synthetic --out data/synthetic --studies 6000 --seed 0 (train.py's defaults)")
    results = default_run_results(RUN_DIR)
    names = cfg.notebooks.split(",") if cfg.notebooks else sorted(p.name for p in Path("notebooks").glob("*.ipynb"))
    missing = [name for name in names if not (Path("notebooks") / name).exists()]
    if missing:
        raise FileNotFoundError(f"--notebooks: no {', '.join(missing)} in notebooks/")
    rendered = {"checkpoint": str(checkpoint), "precision": results["training"]["precision"], "data": "data/synthetic",
                "cpu": cpu_name(), **git_commit(), "command": "python -m tools.render_notebooks"}
    write_json({**results, "rendered": rendered}, RESULTS)  # the checkpoint records no CPU: this is the renderer's
    print(f"wrote {RESULTS}")
    os.environ.update(MACO_CHECKPOINT=str(ROOT / checkpoint), MACO_DATA=str(ROOT / "data/synthetic"),
                      TQDM_DISABLE="1")  # no progress bars in the stored outputs
    with tempfile.TemporaryDirectory() as kernels:
        for name in names:
            print(f"rendering notebooks/{name}")
            render(ROOT / "notebooks" / name, rendered, cfg.timeout, Path(kernels))


def main(argv=None) -> int:
    return run_script(RenderConfig, render_command, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
