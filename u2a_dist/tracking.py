"""Experiment trackers (``runtime.report_to``): rank 0's metrics.jsonl records, mirrored live.

Only TensorBoard is supported: every numeric field of a record becomes a scalar whose tag is
the metrics key and whose step is the record's ``step``, in event files under
``<run>/tensorboard/``. The event files follow metrics.jsonl across restarts: a fresh start
removes an earlier attempt's files (as metrics.jsonl is emptied), a resume at step s hides the
events after s (``purge_step``), as metrics.jsonl drops those lines.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from u2a_dist.config import report_backends

#: Where the TensorBoard event files go, inside the run directory.
TENSORBOARD_DIR = "tensorboard"
#: The name every TensorBoard event file starts with (what a fresh start may delete).
EVENT_PREFIX = "events.out.tfevents."


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields but ``step`` (the x axis itself); bools are flags, not
    measurements, and lists (e.g. ``selector/ihvp_term_norms``) are not scalars."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """The trackers ``report_to`` names, opened at the first record (so a run that logs nothing
    leaves no file) and flushed after each one (a crash loses nothing that was logged)."""

    def __init__(self, report_to: str | list[str], run_path: Path,
                 resumed_from: int | None) -> None:
        self.backends = report_backends(report_to)
        self.log_dir = Path(run_path) / TENSORBOARD_DIR
        self.resumed_from = resumed_from
        self._writer: Any = None
        self._first_open = True

    def log(self, record: dict[str, Any]) -> None:
        if "tensorboard" not in self.backends or "step" not in record:
            return
        writer = self._writer or self._open()
        walltime = time.time()  # one instant per record, as its fields were logged together
        for tag, value in scalars(record).items():
            writer.add_scalar(tag, value, global_step=int(record["step"]), walltime=walltime)
        writer.flush()

    def close(self) -> None:
        """Close the event file; a later record opens a new one beside it."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _open(self) -> Any:
        # Imported here: it costs about a second, and only report_to=tensorboard needs it.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        purge_step = None
        if self._first_open and self.resumed_from is None:  # a fresh start: no earlier attempt
            for old in self.log_dir.glob(EVENT_PREFIX + "*"):
                old.unlink()
        elif self._first_open:  # metrics.jsonl kept the steps up to the checkpoint's: so do we
            purge_step = self.resumed_from + 1
        self._first_open = False  # reopened after close(): this run's own events stay
        self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        return self._writer
