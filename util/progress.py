"""Progress that suits where it goes (docs/reliability.md §5): on a terminal, a tqdm bar; anywhere else (a log file,
`nohup`, a batch job, CI) one plain line every `interval` seconds and one at the end, instead of a bar's hundreds of
carriage-return updates.

    with lines_every(cfg.progress_interval):  # a script's entry point, from its --progress-interval flag
        ...
        with Progress(total=1272, desc="train") as progress:
            for step in ...:
                progress.update(loss=f"{loss:.3f}")

        for batch in track(loader, desc="zero-shot"):  # the same for a plain loop
            ...

A line reads `train: step 240/1272 (19%), 3.61 step/s, loss 3.214`. The interval is the process's, set by the
entry point (where the output goes is the process's too), so library functions need no parameter for it.
"""

import contextlib
import sys
import time

from tqdm import tqdm

from util.cli import option

DEFAULT_INTERVAL = 30.0  # seconds between lines, unless an entry point says otherwise (lines_every)
_interval = DEFAULT_INTERVAL


def progress_interval_option():
    """Every entry point's --progress-interval flag (the field of its config), passed to lines_every."""
    return option(DEFAULT_INTERVAL, "seconds between progress lines when the output is not a terminal (a terminal "
                  "gets a bar)", minimum=0)


@contextlib.contextmanager
def lines_every(seconds: float):
    """While inside, Progress lines (where the output is not a terminal) come every `seconds`; the previous
    interval comes back on exit."""
    global _interval
    previous, _interval = _interval, seconds
    try:
        yield
    finally:
        _interval = previous


class Progress:
    """A counter of `unit`s from `initial` to `total` (None: unknown) printed to `file` (default stderr): a tqdm
    bar when `file` is a terminal, else a line every `interval` seconds (None: the lines_every interval) and at
    close (if `leave` and anything happened since the last line). enabled=False prints nothing (the other ranks of
    a multi-GPU run)."""

    def __init__(self, total: int | None = None, desc: str = "", initial: int = 0, interval: float | None = None,
                 unit: str = "step", leave: bool = True, enabled: bool = True, file=None):
        self.file = file if file is not None else sys.stderr
        self.total, self.desc, self.unit, self.leave, self.enabled = total, desc, unit, leave, enabled
        self.interval = _interval if interval is None else interval
        self.done = self.printed = self.first = initial
        self.postfix: dict = {}
        self.start = self.last_line = self.last_postfix = time.monotonic()
        terminal = enabled and hasattr(self.file, "isatty") and self.file.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                        file=self.file) if terminal else None

    def update(self, n: int = 1, **postfix) -> None:
        """Count n more units; postfix (e.g. loss="3.214", or a number or a 0-d tensor, shown with 4 significant
        digits) is shown with the count from now on. Values are formatted only when shown (a bar's at most twice a
        second): a loss tensor on a GPU is read back then, not at every step."""
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if self.postfix and time.monotonic() - self.last_postfix >= 0.5:
                self.bar.set_postfix(self.shown(), refresh=False)
                self.last_postfix = time.monotonic()
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self.write_line()

    def shown(self) -> dict[str, str]:
        return {key: value if isinstance(value, str) else f"{float(value):.4g}" for key, value in self.postfix.items()}

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = (self.done - self.first) / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else str(self.done)
        extras = "".join(f", {key} {value}" for key, value in self.shown().items())
        speed = f"{1 / rate:.1f} s/{self.unit}" if 0 < rate < 1 else f"{rate:.2f} {self.unit}/s"  # as tqdm does
        return f"{self.desc}: {self.unit} {count}, {speed}{extras}"

    def write_line(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.printed, self.last_line = self.done, time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            if self.postfix:
                self.bar.set_postfix(self.shown(), refresh=False)
            self.bar.close()
        elif self.enabled and self.leave and self.done != self.printed:
            self.write_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable, desc: str = "", total: int | None = None, interval: float | None = None, unit: str = "batch",
          leave: bool = False, enabled: bool = True):
    """Yield the items of `iterable`, counting them in a Progress (total: len(iterable) where it has one)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    with Progress(total, desc, interval=interval, unit=unit, leave=leave, enabled=enabled) as progress:
        for item in iterable:
            yield item
            progress.update()
