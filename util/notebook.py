"""The notebooks' shared set-up: which trained MaCo and which synthetic world they show (their "Which model?" cell).

The model is the first of: the checkpoint named by the environment variable MACO_CHECKPOINT; runs/maco/checkpoint.pt
(the default `python train.py`); runs/notebook/checkpoint.pt (left by an earlier notebook); else a `tiny` model
trained here for a few minutes on a small world of its own. The data is MACO_DATA if set, else data/synthetic,
else that small world.
"""

import os
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


def model_and_data(root: Path) -> tuple[MaCo, object, Path]:
    """(model in eval mode, tokenizer, data folder) for a notebook run from the repository `root`; prints which."""
    checkpoint = os.environ.get("MACO_CHECKPOINT") or next(
        (p for p in (root / "runs/maco/checkpoint.pt", root / "runs/notebook/checkpoint.pt") if p.exists()), None)
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
    print(f"model: {checkpoint} (encoder input {model.cfg.img_size} px, {model.cfg.num_patches} patches of "
          f"{model.cfg.patch_size} px)\ndata:  {data}")
    return model, tokenizer, data
