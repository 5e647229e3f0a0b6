"""Files the project writes and reads back: atomic writes, output-folder checks, safe checkpoint loading.

Every output (checkpoints, logs, plots, caches, metrics) goes through `write_atomic`: the bytes go to a temporary
file beside the target, which is then renamed over it, so a crash or a kill never leaves a half-written file and
never loses the previous one. Checkpoints are read with `torch.load(weights_only=True)`: tensors, numbers and
strings only, never pickled code. Building a model from a checkpoint is `maco.load_checkpoint`'s job.
"""

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import torch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files `.<name>.<pid>.*.tmp` of writes that were killed before their rename: those whose
    process no longer runs are removed (a live process may still be writing its own)."""
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = temp.name[len(path.name) + 2:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            temp.unlink(missing_ok=True)
        except PermissionError:  # another user's live process
            pass


def write_atomic(path, write) -> None:
    """write(temporary path) beside `path`, then os.replace: a crash never leaves a half-written file. The file
    gets the usual permissions (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def check_writable(folder, flag: str = "--out") -> Path:
    """Create `folder` if needed and prove a file can be written there, before any work starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{flag} {folder}: cannot write there ({error.strerror or error}); "
                         f"choose a writable folder") from None
    return folder


def save_checkpoint(path, state: dict) -> None:
    """torch.save through write_atomic: a kill mid-write leaves the previous checkpoint intact."""
    write_atomic(path, lambda temp: torch.save(state, temp))


def read_checkpoint(path, what: str = "checkpoint", required=(), allowed_classes=()) -> dict:
    """torch.load with weights_only=True (tensors, numbers, strings: no pickled code), and errors that name the
    file and what was expected. `what` names the flag or role of the file in messages. `allowed_classes`: plain
    data classes the file may also pickle (the released maco.pth pickles an argparse.Namespace); any other
    pickled object is refused, since unpickling it could run code from the file."""
    try:
        with torch.serialization.safe_globals(list(allowed_classes)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path}: is a folder; expected a checkpoint file") from None
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch names the object it would not unpickle
        if not refused:
            raise ValueError(f"{what} {path}: not a readable PyTorch checkpoint ({error})") from None
        plain = ", ".join(["tensors, numbers, strings, lists, dicts"] + [c.__module__ + "." + c.__qualname__
                                                                          for c in allowed_classes])
        raise ValueError(f"{what} {path}: refused: the file pickles {refused.group(1)}, which is not plain data "
                         f"({plain}); unpickling it could run code from the file, so it is not loaded") from None
    except Exception as error:
        raise ValueError(f"{what} {path}: not a readable PyTorch checkpoint ({error})") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what} {path}: expected a dict, got {type(checkpoint).__name__}")
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise ValueError(f"{what} {path}: not a checkpoint written by train.py (it lacks {missing})")
    return checkpoint


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)  # strict JSON has no NaN
    return value.item() if isinstance(value, np.generic) else value


def write_json(data: dict, path) -> None:
    """Strict JSON (NaN becomes null), written atomically."""
    write_atomic(path, lambda temp: Path(temp).write_text(json.dumps(_jsonable(data), indent=2)))
