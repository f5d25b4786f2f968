"""The training command's progress display: one line on stderr with the running losses (a
`training.fit` callback)."""

from __future__ import annotations

import sys

from training.budget import FitPlan

__all__ = ["ProgressBar"]


class ProgressBar:
    """A one-line progress display on stderr with the running losses."""

    def __init__(self, epochs: int = 0, stream=sys.stderr) -> None:
        self.epochs, self.stream = epochs, stream

    def on_plan(self, plan: FitPlan) -> None:
        self.epochs = plan.epochs

    def on_epoch_end(self, epoch: int, train_loss: float, val_loss: float | None) -> None:
        cycle = max(1, self.epochs)  # a run that goes on past its plan: a line per cycle
        total = cycle * (epoch // cycle + 1)
        done = int(20 * (epoch + 1 - (total - cycle)) / cycle)
        val = "" if val_loss is None else f"  val {val_loss:.5f}"
        end = "\n" if epoch + 1 == total else ""
        self.stream.write(
            f"\r[{'#' * done}{'.' * (20 - done)}] epoch {epoch + 1}/{total}"
            f"  train {train_loss:.5f}{val}{end}"
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()
