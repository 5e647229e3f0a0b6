"""Files the project writes and reads back: atomic writes, appended logs, output-folder checks, safe checkpoint
loading (docs/reliability.md).

Every output (checkpoints, plots, caches, metrics) goes through `write_atomic`: the bytes go to a temporary file
beside the target, which is flushed to disk and then renamed over it, so a crash, a kill or a full disk never
leaves a half-written file and never loses the previous one. Logs grow by `append_line`, which cuts a failed
append back off; `read_log` drops a last line cut short by a kill. A failed write raises `WriteError`, naming the
file and why. Checkpoints are read with `torch.load(weights_only=True)`: tensors, numbers and strings only, never
pickled code, after checking the archive's checksums. Building a model from a checkpoint is `maco.load`'s job.
"""

import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import zipfile
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


class WriteError(OSError):
    """A file could not be written (a full disk, no permission, ...). The message names the file and the reason;
    the file's previous version, if any, is unchanged."""

    @classmethod
    def of(cls, path, error: Exception) -> "WriteError":
        path = Path(path)
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        except OSError:
            free = ""
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return cls(f"could not write {path} ({reason}{free}); its previous version, if any, is unchanged: free "
                   f"some space (or fix the folder's permissions) and run the command again")


def _fsync(path) -> None:
    """Flush a file's (or a folder's: a rename's) data to the disk, so a power cut cannot undo what follows."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path, write) -> None:
    """write(temporary path) beside `path`, then fsync and os.replace: a crash, a kill or a full disk never leaves
    a half-written file (an OSError becomes a WriteError naming `path`). The file gets the usual permissions
    (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        os.close(handle)
        write(temp)
        _fsync(temp)
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
        _fsync(path.parent)
    except OSError as error:
        raise WriteError.of(path, error) from None
    finally:
        if temp and os.path.exists(temp):
            os.remove(temp)


def append_line(path, line: str) -> None:
    """Append `line` and a newline to a log, and fsync it. A failed append (a full disk) is cut back off, so the
    file keeps whole lines only, and raises a WriteError naming the file."""
    path, data = Path(path), (line + "\n").encode()
    try:
        with open(path, "ab", buffering=0) as log:
            start = log.seek(0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):
                    written += log.write(data[written:])
                os.fsync(log.fileno())
            except OSError:
                log.truncate(start)
                raise
    except OSError as error:
        raise WriteError.of(path, error) from None


def read_log(path) -> list[dict]:
    """The records of a JSON-lines log. A last line without its newline was cut short by a kill: it is dropped,
    and said. A damaged line before it is an error naming the file and the line."""
    path = Path(path)
    text = path.read_text()
    lines = text.split("\n")
    if lines[-1]:
        print(f"{path}: dropped its last line, cut short when the run was stopped ({len(lines[-1])} characters)",
              file=sys.stderr)
    records = []
    for number, line in enumerate(lines[:-1], 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error}); the log is damaged: delete that "
                             f"line (or the file, losing the loss history) and run the command again") from None
    return records


def read_json(path):
    """A JSON file written by this project; a damaged one is a ValueError naming it (no bare parser message)."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); it was changed after it was written: delete it and run "
                         f"the command again, which writes it anew") from None


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
    """torch.save through write_atomic: a kill or a full disk mid-write leaves the previous checkpoint intact."""
    def write(temp):
        try:
            torch.save(state, temp)
        except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) as a RuntimeError
            raise OSError(f"torch.save failed: {error}") from None
    write_atomic(path, write)


def _damage(path) -> str | None:
    """What is wrong with a checkpoint file that torch.load cannot be trusted with, or None. torch.save writes a
    zip archive with a CRC-32 per tensor, which torch.load does not check: a flipped byte would load silently."""
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as file:
            starts_as_zip = file.read(4) == b"PK\x03\x04"
        if starts_as_zip:
            return f"cut short ({size} bytes): it starts as torch.save's zip archive but lacks the archive's end"
        return None  # another format (torch's legacy one): torch.load judges it
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        return f"a damaged archive ({error}; {size} bytes)"
    return f"damaged: {failed} fails its checksum" if failed else None


CORRUPT_HINT = ("it was cut short or changed after it was written (a kill or a full disk while copying it?); use an "
                "earlier copy or checkpoint, or rerun the command that wrote it")


def _unreadable(what: str, path, error: Exception) -> ValueError:
    detail = str(error).split(". ")[0]  # torch's first sentence; the rest is advice about weights_only
    return ValueError(f"{what} {path}: not a readable PyTorch checkpoint ({detail}; {os.path.getsize(path)} bytes); "
                      f"{CORRUPT_HINT}")


def read_checkpoint(path, what: str = "checkpoint", required=(), allowed_classes=()) -> dict:
    """torch.load with weights_only=True (tensors, numbers, strings: no pickled code), and errors that name the
    file and what was expected. `what` names the flag or role of the file in messages. `allowed_classes`: plain
    data classes the file may also pickle (the released maco.pth pickles an argparse.Namespace); any other
    pickled object is refused, since unpickling it could run code from the file."""
    try:
        damage = _damage(path)
        if damage:
            raise ValueError(f"{what} {path}: {damage}; {CORRUPT_HINT}")
        with torch.serialization.safe_globals(list(allowed_classes)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path}: is a folder; expected a checkpoint file") from None
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))  # torch names the object it would not unpickle
        if not refused:
            raise _unreadable(what, path, error) from None
        plain = ", ".join(["tensors, numbers, strings, lists, dicts"] + [c.__module__ + "." + c.__qualname__
                                                                          for c in allowed_classes])
        raise ValueError(f"{what} {path}: refused: the file pickles {refused.group(1)}, which is not plain data "
                         f"({plain}); unpickling it could run code from the file, so it is not loaded") from None
    except Exception as error:
        raise _unreadable(what, path, error) from None
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


def write_arrays(path, arrays: dict[str, np.ndarray]) -> None:
    """Named numpy arrays as a compressed .npz, written atomically (read back with read_arrays)."""
    def write(temp):
        with open(temp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    write_atomic(path, write)


def read_arrays(path) -> dict[str, np.ndarray]:
    """The arrays of a write_arrays file (no pickled objects)."""
    with np.load(path, allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}
