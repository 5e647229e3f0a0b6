"""The teaching notebooks (notebooks/*.ipynb, issue 6) run top to bottom without an error, and their stored outputs
(rendered by `python -m tools.render_notebooks` from the default run, issue 30) come from their current code cells.

Each notebook is executed by jupyter's own executor, nbclient, in a kernel started with this test's interpreter
(the virtual environment's python, whatever kernels the machine has installed). One small synthetic world and
one short `tiny` training run are shared by all notebooks and handed to them through MACO_DATA and
MACO_CHECKPOINT, so the notebooks never fall back to training inside themselves and write nothing into the
repository. The model is barely trained: this checks that the notebooks run, not what they show.
"""
import sys
from pathlib import Path

import nbformat
import pytest

from util.notebook import code_cells_hash

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_masking_and_reconstruction.ipynb", "02_correlation_weighted_loss.ipynb",
             "03_zero_shot_classification.ipynb", "04_phrase_grounding.ipynb"]
MAX_NOTEBOOK_BYTES = 1_000_000  # outputs small enough to read on a repository page
MAX_STREAM_LINES = 60  # no training logs or progress bars in the stored outputs


def stored(name):
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(notebook)
    return notebook


def test_the_four_notebooks_are_stored_with_outputs_rendered_from_their_current_code_cells():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        notebook = stored(name)
        code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code_cells, name
        rendered = notebook.metadata.get("rendered")
        assert rendered, f"{name}: no rendering recorded; run python -m tools.render_notebooks"
        assert rendered["code_cells_sha256"] == code_cells_hash(notebook), \
            f"{name}: a code cell changed after its outputs were rendered; run python -m tools.render_notebooks"
        assert {"checkpoint", "precision", "cpu", "commit"} <= set(rendered), name
        assert all(cell.execution_count is not None for cell in code_cells), f"{name}: a code cell was not run"
        assert not any(output.output_type == "error" for cell in code_cells for output in cell.outputs), name


def test_the_stored_outputs_show_figures_and_stay_small():
    for name in NOTEBOOKS:
        notebook = stored(name)
        outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
        assert any("image/png" in output.get("data", {}) for output in outputs), f"{name}: no figure stored"
        assert (NOTEBOOK_DIR / name).stat().st_size < MAX_NOTEBOOK_BYTES, name
        for output in outputs:
            if output.output_type == "stream":
                assert output.text.count("\n") <= MAX_STREAM_LINES, f"{name}: a long log in the stored outputs"


def test_the_code_cell_hash_changes_with_any_code_cell_and_not_with_prose():
    notebook = stored(NOTEBOOKS[0])
    before = code_cells_hash(notebook)
    markdown = next(cell for cell in notebook.cells if cell.cell_type == "markdown")
    markdown.source += "\nMore prose."
    assert code_cells_hash(notebook) == before
    code = [cell for cell in notebook.cells if cell.cell_type == "code"][-1]
    code.source += "\n"
    assert code_cells_hash(notebook) != before


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
    """A kernel of this test's interpreter (util/notebook.py: the same environment as the test)."""
    from util.notebook import kernel_manager
    return kernel_manager(tmp_path)


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
