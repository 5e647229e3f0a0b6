"""One run per output folder, and a clean stop on SIGTERM or Ctrl-C (docs/reliability.md).

`OutDirLock`: train.py, finetune.py, tools/ablate.py and `data.py cache` hold `<folder>/run.lock` (a POSIX lock,
with the pid written in it) while they run, so a second command on the same folder stops at once and names the
first. The kernel drops the lock when its process dies, however it dies, and forked DataLoader workers do not
inherit it: a lock file left by a killed run is taken over, and said.

`StopSignals`: the first SIGTERM (a scheduler's) or SIGINT (Ctrl-C) only sets `requested`; the training loop
finishes its step, writes a checkpoint and exits with 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C).
A second signal ends the process at once, as the signal itself would have.
"""

import contextlib
import fcntl
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from util.checkpoint import check_writable


class OutDirLock:
    """`with OutDirLock(folder, "--out-dir"):` hold folder/run.lock; a ValueError naming the holder's pid if a
    live process holds it. enabled=False (the other ranks of a multi-GPU run) does nothing. A folder the lock
    created is removed again if nothing else was written there (a command that stopped at a bad flag)."""

    def __init__(self, folder, flag: str = "--out-dir", enabled: bool = True):
        self.path, self.flag, self.enabled, self.file = Path(folder) / "run.lock", flag, enabled, None
        self.created_folder = False

    def __enter__(self):
        if not self.enabled:
            return self
        self.created_folder = not self.path.parent.exists()
        check_writable(self.path.parent, self.flag)
        while self.file is None:
            lock_file = open(self.path, "a+")
            try:
                fcntl.lockf(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):
                lock_file.seek(0)
                holder = lock_file.read().strip() or "?"
                lock_file.close()
                raise ValueError(f"{self.flag} {self.path.parent} is in use by process {holder} (lock file "
                                 f"{self.path}); wait for it to finish or stop it, or choose another {self.flag}") from None
            if not self.path.exists() or os.stat(self.path).st_ino != os.fstat(lock_file.fileno()).st_ino:
                lock_file.close()  # the holder removed the file as we locked it: lock the new one
                continue
            lock_file.seek(0)
            previous = lock_file.read().strip()
            if previous:
                print(f"{self.path}: taking over from process {previous}, which stopped without releasing it",
                      file=sys.stderr)
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(str(os.getpid()))
            lock_file.flush()
            self.file = lock_file
        return self

    def __exit__(self, *exc_info):
        if self.file is not None:
            self.path.unlink(missing_ok=True)
            self.file.close()  # releases the lock
            self.file = None
            if self.created_folder and not any(self.path.parent.iterdir()):
                with contextlib.suppress(OSError):  # another command wrote there meanwhile
                    self.path.parent.rmdir()


class StopSignals:
    """`with StopSignals() as stop:` while inside, SIGTERM and SIGINT set stop.requested (the signal's number)
    instead of ending the process; a second one ends it at once. The previous handlers come back on exit. Outside
    the main thread (where Python cannot catch signals) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested, self.previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame):
        name = signal.Signals(number).name
        if self.requested:  # the second signal: end now, as the signal itself would
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
            return
        self.requested = number
        # os.write, not print: a handler may run while the main code is inside a print to the same stream
        os.write(sys.stderr.fileno(), f"\n{name}: finishing this step, then writing a checkpoint "
                                      f"(send it again to stop at once)\n".encode())

    def should_stop(self, world: int, device, at_log: bool) -> bool:
        """Whether to stop after this step: at once in one process; in a multi-process run at a log step, where
        the processes agree (a signal may reach them at different steps)."""
        if world == 1:
            return bool(self.requested)
        if not at_log:
            return False
        requested = torch.tensor(float(bool(self.requested)), device=device)
        torch.distributed.all_reduce(requested, op=torch.distributed.ReduceOp.MAX)
        return bool(requested.item())

    @property
    def exit_code(self) -> int:
        return 128 + self.requested


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader worker's worker_init_fn: Ctrl-C reaches every process of the terminal's group, but only the
    main process decides when to stop (a worker ended by it would fail the batch the step is waiting for)."""
    for number in StopSignals.SIGNALS:
        signal.signal(number, signal.SIG_IGN)
