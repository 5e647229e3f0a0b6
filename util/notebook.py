"""The notebooks' shared set-up: which trained MaCo and which synthetic world they show (their "Which model?" cell).

The model is the first of: the checkpoint named by the environment variable MACO_CHECKPOINT; runs/maco/checkpoint.pt
(the default `python train.py`); runs/notebook/checkpoint.pt (left by an earlier notebook); else a `tiny` model
trained here for a few minutes on a small world of its own. The data is MACO_DATA if set, else data/synthetic,
else that small world.

Also what executes them (tools/render_notebooks.py, tests/test_notebooks.py): a kernel of this interpreter, and the
hash of a notebook's code cells that its stored outputs were rendered from.
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from maco import MaCo, load
from world.synthetic import generate


def notebook_world(root: Path) -> Path:
    """A small synthetic world of the notebooks' own (800 studies). Seed 1: it shares no study with
    data/synthetic (seed 0)."""
    world = root / "data/synthetic-notebook"
    if not (world / "mimic-cxr-2.0.0-metadata.csv.gz").exists():
        generate(world, studies=800, seed=1, image_size=128)
    return world


def within(root: Path, path) -> str:
    """`path` relative to the repository `root` where it lies inside it (no machine's folders in stored outputs)."""
    path = Path(path).resolve()
    return str(path.relative_to(root.resolve())) if path.is_relative_to(root.resolve()) else str(path)


def chosen_checkpoint(root: Path) -> Path | None:
    """The first of MACO_CHECKPOINT, runs/maco/checkpoint.pt and runs/notebook/checkpoint.pt; None if none exists."""
    if os.environ.get("MACO_CHECKPOINT"):
        return Path(os.environ["MACO_CHECKPOINT"])
    return next((p for p in (root / "runs/maco/checkpoint.pt", root / "runs/notebook/checkpoint.pt") if p.exists()), None)


def model_and_data(root: Path) -> tuple[MaCo, object, Path]:
    """(model in eval mode, tokenizer, data folder) for a notebook run from the repository `root`; prints which."""
    checkpoint = chosen_checkpoint(root)
    if checkpoint is None:
        from train import TrainConfig, train  # only here: the notebooks need not import the training script
        print("No checkpoint found: training a tiny model for a few minutes (the fallback described above).")
        checkpoint = train(TrainConfig(root=str(notebook_world(root)), out_dir=str(root / "runs/notebook"), epochs=16,
                                       lr=2e-3, num_workers=1, eval=False, ckpt_interval=10**9))["checkpoint"]
    model, tokenizer = load(checkpoint)
    if os.environ.get("MACO_DATA"):
        data = Path(os.environ["MACO_DATA"])
    elif (root / "data/synthetic/mimic-cxr-2.0.0-metadata.csv.gz").exists():
        data = root / "data/synthetic"
    else:
        data = notebook_world(root)
    print(f"model: {within(root, checkpoint)} (encoder input {model.cfg.img_size} px, {model.cfg.num_patches} "
          f"patches of {model.cfg.patch_size} px)\ndata:  {within(root, data)}")
    return model, tokenizer, data


def code_cells_hash(notebook) -> str:
    """sha256 of a notebook's code cells, in order (their source only): what its stored outputs were rendered from.
    Markdown cells are not part of it: prose can change without a re-render."""
    sources = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256(json.dumps(sources).encode()).hexdigest()


def kernel_manager(spec_dir: Path):
    """A kernel manager whose only kernel runs `sys.executable -m ipykernel_launcher` (its spec written under
    `spec_dir`): the kernel imports this environment, even where a user-level "python3" kernelspec points elsewhere."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = Path(spec_dir) / "kernels" / "maco"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "MaCo", "language": "python"}))
    return KernelManager(kernel_name="maco", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))
