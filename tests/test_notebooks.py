"""The teaching notebooks (notebooks/*.ipynb, issue 6) run top to bottom without an error.

Each notebook is executed by jupyter's own executor, nbclient, in a kernel started with this test's interpreter
(the virtual environment's python, whatever kernels the machine has installed). One small synthetic world and
one short `tiny` training run are shared by all notebooks and handed to them through MACO_DATA and
MACO_CHECKPOINT, so the notebooks never fall back to training inside themselves and write nothing into the
repository. The model is barely trained: this checks that the notebooks run, not what they show.
"""
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_masking_and_reconstruction.ipynb", "02_correlation_weighted_loss.ipynb",
             "03_zero_shot_classification.ipynb", "04_phrase_grounding.ipynb"]


def test_the_four_notebooks_are_stored_without_outputs():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
        nbformat.validate(notebook)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code_cells, name
        for cell in code_cells:
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: strip the outputs before committing"


@pytest.fixture(scope="module")
def notebook_inputs(tmp_path_factory):
    """(checkpoint, synthetic world): runs/maco/checkpoint.pt if `python train.py` wrote one, else 16 training
    steps of `tiny` on a 600-study world (well under a minute on 2 idle CPU cores)."""
    from train import TrainConfig, train
    from world.synthetic import generate

    folder = tmp_path_factory.mktemp("notebook-inputs")
    world = folder / "synthetic"
    generate(world, studies=600, seed=0, image_size=128, verbose=False)
    checkpoint = ROOT / "runs" / "maco" / "checkpoint.pt"
    if not checkpoint.exists():
        checkpoint = train(TrainConfig(root=str(world), out_dir=str(folder / "run"), epochs=1, num_workers=0,
                                       eval=False, log_interval=16))["checkpoint"]
    return str(checkpoint), str(world)


@pytest.fixture()
def kernel_manager(tmp_path):
    """A kernel manager whose only kernel runs `sys.executable -m ipykernel_launcher`: the kernel imports the
    same environment as this test, even where a user-level "python3" kernelspec points elsewhere."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = tmp_path / "kernels" / "maco-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "MaCo test kernel", "language": "python"}))
    return KernelManager(kernel_name="maco-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom_without_error(name, notebook_inputs, kernel_manager, monkeypatch):
    from nbclient import NotebookClient

    checkpoint, world = notebook_inputs
    monkeypatch.setenv("MACO_CHECKPOINT", checkpoint)  # the kernel inherits this process's environment
    monkeypatch.setenv("MACO_DATA", world)
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))  # which python ran it
    client = NotebookClient(notebook, km=kernel_manager, timeout=600, startup_timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})  # cwd = notebooks/, as in jupyter
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    ran = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in ran)
    assert not any(output.output_type == "error" for cell in ran for output in cell.outputs)
    assert ran[-1].outputs[0].text.strip() == sys.executable
