"""Fine-tuning tables that survive a kill, as train.py does (docs/reliability.md §2): finetune.py, segment.py and
detect.py run a table of runs (recipe x initialisation, x mode for finetune.py), each in its own folder
<out-dir>/<recipe>/<run>/, and rerunning the same command on the same --out-dir continues the table:

  <run>/settings.json      the run's settings, written before it starts: a command that would run it with other
                           settings (apart from SESSION_FIELDS and TABLE_FIELDS) while it holds a state or a result
                           stops with an error naming the flag; --fresh starts its runs over
  <run>/state.pt           every --state-interval steps and at SIGTERM or Ctrl-C: the step, weights, optimiser, the
                           best weights and validation history so far, the losses and the random state, from which
                           the run continues to exactly the weights of an uninterrupted one; removed when it ends
  <run>/result.json        written last, when the run has its test results: a rerun reads it and trains nothing,
                           also from a command whose table includes it (segment.py --recipe synthetic-1 after
                           segment.py --recipe synthetic)

A signal finishes the step, writes state.pt, prints the command that continues and exits with 128 + the signal's
number (143 for SIGTERM, 130 for Ctrl-C); a second signal ends the process at once (util/run_guard.StopSignals).
Every file goes through util/checkpoint's atomic writes. Exact continuation needs the data order and augmentation
to come from the main process: with DataLoader workers (--workers > 0) a resumed run draws its augmentation from
new worker seeds, the same distribution but not the same numbers.
"""

import dataclasses
import itertools
import shlex
import sys
from pathlib import Path

import torch

from util.checkpoint import read_checkpoint, read_json, save_checkpoint, write_json
from util.cli import option
from util.run_guard import StopSignals

# settings that change how a table runs or where it writes, not what a run computes: free to differ on a rerun
SESSION_FIELDS = ("out_dir", "figure", "redraw", "fresh", "device", "workers", "progress_interval", "state_interval")
TABLE_FIELDS = ("recipe", "scratch", "linear_probe")  # which runs a table holds (a run's folder names its recipe)
STATE_FILE, RESULT_FILE, SETTINGS_FILE = "state.pt", "result.json", "settings.json"


def fresh_option():
    """The --fresh flag of the three scripts (the field of their configs), passed to claim."""
    return option(False, "start the runs of this command over instead of continuing them")


def state_interval_option():
    """The --state-interval flag of the three scripts, ResumableRun's interval."""
    return option(100, "steps between the resumable states of a run (<run>/state.pt; also written at SIGTERM or "
                  "Ctrl-C); 0: only at a signal", minimum=0)


def continue_command(script: str, argv: list[str] | None) -> str:
    """The command line that continues a table: the same command (argv None: this process's own arguments)."""
    return shlex.join(["python", script] + list(sys.argv[1:] if argv is None else argv))


def claim(runs: list["ResumableRun"], fresh: bool) -> None:
    """Before a table starts: every run's folder either holds nothing to continue, or holds the same settings (a
    ValueError names the first flag that differs, before any work); fresh: forget what they hold. Then each
    folder's settings.json says what it is about to hold."""
    for run in runs:
        if fresh:
            for name in (STATE_FILE, RESULT_FILE):
                (run.folder / name).unlink(missing_ok=True)
        elif (run.folder / SETTINGS_FILE).is_file() and run.has_work():
            held = read_json(run.folder / SETTINGS_FILE)
            for key, value in run.settings.items():
                if key in held and held[key] != value:
                    raise ValueError(f"{run.folder} holds a run with --{key.replace('_', '-')} {held[key]}, not "
                                     f"{value}: rerun with the same settings to continue it, pass --fresh to start "
                                     f"it over, or choose another --out-dir")
    for run in runs:
        write_json(run.settings, run.folder / SETTINGS_FILE)


def random_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class Skip(torch.utils.data.Sampler):
    """The indices of `sampler` after its first `count`: a resumed run's training batches continue where the
    interrupted run's stopped (the samplers here are endless and seeded, so their order is a function of the seed)."""

    def __init__(self, sampler, count: int):
        self.sampler, self.count = sampler, count

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.count, None)


class ResumableRun:
    """One run of a table in `folder`, made with `setting` (its script's config, the recipe filled in): its result
    if it has finished, its state if it was interrupted, and what a fit loop does after each step (state every
    `interval` steps; at a signal, state then exit)."""

    def __init__(self, folder, setting, interval: int, stop: StopSignals | None = None, command: str = ""):
        self.folder, self.interval, self.stop, self.command = Path(folder), interval, stop, command
        self.settings = {key: value for key, value in dataclasses.asdict(setting).items()
                         if key not in SESSION_FIELDS + TABLE_FIELDS}

    def has_work(self) -> bool:
        return (self.folder / STATE_FILE).is_file() or (self.folder / RESULT_FILE).is_file()

    def result(self) -> dict | None:
        path = self.folder / RESULT_FILE
        return read_json(path) if path.is_file() else None

    def state(self) -> dict | None:
        path = self.folder / STATE_FILE
        return read_checkpoint(path, "resumable state") if path.is_file() else None

    def after_step(self, step: int, model, optimizer, best: dict, validations: dict, losses: list) -> None:
        """After a fit loop's `step`: write its state (what `restore` reads back) when `step` is a multiple of the
        interval or a signal came; after a signal, say how to continue and exit (SystemExit 143 for SIGTERM, 130
        for Ctrl-C)."""
        stopping = self.stop is not None and bool(self.stop.requested)
        if stopping or (self.interval and step % self.interval == 0):
            save_checkpoint(self.folder / STATE_FILE, dict(
                step=step, model=model.state_dict(), optimizer=optimizer.state_dict(), best=best,
                validations=validations, losses=as_floats(losses), random=random_state()))
        if stopping:
            print(f"stopped at step {step} of {self.folder}; continue with: {self.command}", flush=True)
            raise SystemExit(self.stop.exit_code)

    def check_stop(self) -> None:
        """Between runs: a signal that came while none was training stops here (the finished runs are kept)."""
        if self.stop is not None and self.stop.requested:
            print(f"stopped after {self.folder}; continue with: {self.command}", flush=True)
            raise SystemExit(self.stop.exit_code)

    def finish(self, result: dict) -> None:
        """The run is complete: its result, written last; its resumable state is no longer needed."""
        write_json(result, self.folder / RESULT_FILE)
        (self.folder / STATE_FILE).unlink(missing_ok=True)


def as_floats(losses: list) -> list:
    """A fit loop's losses as floats, in place: the tensors appended since the last call are read back in one
    transfer (one host sync however many steps; each earlier loss is read once, not at every state)."""
    first = len(losses)
    while first and isinstance(losses[first - 1], torch.Tensor):
        first -= 1
    if first < len(losses):
        losses[first:] = torch.stack(losses[first:]).tolist()  # (steps since the last call,) -> floats
    return losses


def restore(state: dict, model, optimizer) -> tuple[int, dict, dict, list]:
    """Load a fit loop's state into model and optimizer and the random generators; returns (step, best,
    validations, losses) as they were after that step."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_random_state(state["random"])
    return state["step"], state["best"], state["validations"], state["losses"]
