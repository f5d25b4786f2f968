"""The CPU scoring pass as one TorchScript graph.

Run op by op from Python, a forward pass hands the interpreter lock back and forth some 70 times
(once per operation); beside a thread that runs Python (the worker's loop, decoding the next
poll) each hand-back waits for that thread's switch interval, and the pass takes many times its
own length (measured on 2 cores: 1,250 windows, 12 ms alone, 2.1 s beside a busy Python thread).
Traced once per detector, the pass (scaling, model, score and attribution) runs as one call that
holds no lock while it computes (87 ms beside the same thread). The graph records the same
operations in the same order, so it gives the eager pass's results bit for bit, in any batch.
A window's score does not depend on the batch it comes in either: CPU batches go through in
whole blocks of rows (`ROW_BLOCK`).

A large CPU batch goes through the graph in slices of about `CPU_SLICE_VALUES` input values per
thread, a loop that runs in TorchScript too (no lock taken between slices). A whole batch's
intermediate tensors are several MiB each: the C allocator maps them fresh and hands them back
to the system at the end of each pass, so the next pass faults every page in again, and each of
the score's elementwise steps goes through memory. A slice's are reused from one slice to the next
and stay in the core's cache. Each slice is a whole number of row blocks, so every window's result
is the one it has in any batch.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn

from pipeline.detector.models import ModelConfig
from pipeline.detector.scaler import SCALED_LIMIT
from pipeline.detector.scoring import ScoreStats, score_parts

__all__ = ["ScoringPass"]

log = logging.getLogger(__name__)

Outputs = tuple[torch.Tensor | None, ...]
# CPU batches are scored in whole blocks of this many rows. The BLAS behind a linear layer computes
# the rows past its last whole tile by another kernel, summing a row's products in another order:
# the same window scored alone and in a batch would differ in the last bits. Measured with MKL
# 2024.2 on AVX-512, products of 4,096 rows of 16 to 3,072 inputs into 3 to 512 outputs, cut into
# matrices of whole blocks: blocks of 4 or 8 rows changed 32 of 56 shapes (a window of 64 x 8 into
# 128 units among them), blocks of 16 none on one thread. On several threads a product of 1,024
# inputs or more is also split along its inputs, by the thread count: such a window's last bits
# can depend on how many threads scored it.
ROW_BLOCK = 16
# Input values per slice of a CPU pass and thread: 1 MiB of float32 (512 windows of 64 x 8).
# Measured on 2 cores, 4,096 windows of 64 x 8 through an undercomplete dense model with the terms
# score, one thread: 49 ms and 10,400 page faults a pass in one piece, 31 ms and none in slices
# (33 against 30 ms with the allocator told to keep its memory); beside a busy Python thread the
# slices keep their pace (50.8 against 37.9 ms).
CPU_SLICE_VALUES = 1 << 18


def slice_rows(sample_shape: tuple[int, ...], threads: int = 1) -> int:
    """Rows per slice of a CPU pass on `threads` threads for inputs of `sample_shape`: whole row
    blocks, at least one; each thread takes its share of a slice's rows."""
    rows = CPU_SLICE_VALUES * max(1, threads) // max(1, math.prod(sample_shape))
    return max(ROW_BLOCK, rows - rows % ROW_BLOCK)


class _Pass(nn.Module):
    """Raw inputs scaled by (center, scale), then `score_parts`; with `extremes`, also each raw
    window's minimum and maximum of its first `extremes` features (what `window_extremes` of the
    adaptive stage gives: one reduction, where the stage's folds in halves would be a dozen
    elementwise steps, each a parallel region on a pass of several threads)."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        stats: ScoreStats | None,
        attribution: bool,
        extremes: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.config, self.stats, self.attribution = config, stats, attribution
        self.extremes = extremes

    def eager(self, raw: torch.Tensor, center: torch.Tensor, scale: torch.Tensor) -> Outputs:
        x = ((raw - center) / scale).clamp_(-SCALED_LIMIT, SCALED_LIMIT)  # (in place: no copy)
        out = score_parts(
            self.model, self.config, x, attribution=self.attribution, stats=self.stats
        )
        if not self.extremes:
            return out
        return out + tuple(torch.aminmax(raw[..., : self.extremes], dim=1))

    def forward(self, raw: torch.Tensor, center: torch.Tensor, scale: torch.Tensor):
        """What a graph can return: the outputs, the Nones left out."""
        return [t for t in self.eager(raw, center, scale) if t is not None]


class _Slices(nn.Module):
    """A traced pass over a batch in slices of `rows` rows, joined: scripted, so the loop runs
    with the graph, holding no interpreter lock. A center or scale of one row broadcasts."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.graph = graph

    def forward(
        self, raw: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, rows: int
    ) -> list[torch.Tensor]:
        n = raw.size(0)
        if n <= rows:
            return self.graph(raw, center, scale)
        parts: list[list[torch.Tensor]] = []
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            c = center if center.size(0) == 1 else center[start:stop]
            s = scale if scale.size(0) == 1 else scale[start:stop]
            parts.append(self.graph(raw[start:stop], c, s))
        return [torch.cat([part[i] for part in parts]) for i in range(len(parts[0]))]


class ScoringPass:
    """`score_parts` of raw inputs scaled by (center, scale): on the CPU traced at the first
    call of each attribution setting, elsewhere (or for a model that cannot be traced) op by
    op."""

    def __init__(self, model: nn.Module, config: ModelConfig, stats: ScoreStats | None) -> None:
        self.model, self.config, self.stats = model, config, stats
        # (attribution, extremes) -> the pass op by op; -> (graph, which outputs are None)
        self._steps: dict[tuple[bool, int], _Pass] = {}
        self._traced: dict[tuple[bool, int], tuple | None] = {}

    def __call__(
        self,
        raw: torch.Tensor,
        center: torch.Tensor,
        scale: torch.Tensor,
        attribution: bool,
        extremes: int = 0,
    ) -> Outputs:
        """(scores, map_a, map_b, terms) as `score_parts` gives them, then with `extremes` the
        windows' minima and maxima of their first `extremes` features."""
        n = len(raw)
        pad = -n % ROW_BLOCK if raw.device.type == "cpu" else 0
        if pad:  # the last row again: each row's result is that of a batch of whole blocks
            index = torch.arange(n + pad).clamp_(max=n - 1)
            raw, center, scale = _rows(raw, center, scale, index)
        out = self._run(raw, center, scale, (attribution, extremes))
        return tuple(None if t is None else t[:n] for t in out) if pad else out

    def _run(
        self, raw: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, kind: tuple[bool, int]
    ) -> Outputs:
        step = self._steps.get(kind)
        if step is None:
            step = self._steps[kind] = _Pass(self.model, self.config, self.stats, *kind)
        if raw.device.type != "cpu" or torch.is_grad_enabled():
            return step.eager(raw, center, scale)
        if kind not in self._traced:
            self._traced[kind] = _trace(step, raw, center, scale)
        traced = self._traced[kind]
        if traced is None:
            return step.eager(raw, center, scale)
        graph, absent = traced
        rows = slice_rows(tuple(raw.shape[1:]), torch.get_num_threads())
        present = iter(graph(raw, center, scale, rows))
        return tuple(None if missing else next(present) for missing in absent)


def _trace(step: _Pass, raw, center, scale) -> tuple | None:
    """(graph, which outputs are None) of `step` traced on two inputs, run in slices given when
    called, or None if it cannot be traced or its graph, given three inputs, does not give what
    the eager pass gives (a size the model takes as a Python number is fixed in the graph)."""
    two, three = (_rows(raw, center, scale, torch.arange(n)) for n in (2, 3))
    try:
        absent = tuple(t is None for t in step.eager(*two))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # (tracing is kept for this use)
            traced = torch.jit.trace(step, two, check_trace=False, strict=False)
            graph = _sliced(traced)
        want, got = step.forward(*three), graph(*three, ROW_BLOCK)
        same = len(got) == len(want) and all(map(torch.equal, got, want))
    except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
        log.warning("scoring op by op: the model could not be traced (%s)", exc)
        return None
    if not same:
        log.warning("scoring op by op: the traced model does not score as the model does")
        return None
    return graph, absent


def _sliced(traced: torch.jit.ScriptModule):
    """`traced` looped over slices in TorchScript, or called in one piece where this torch
    cannot script the loop."""
    try:
        return torch.jit.script(_Slices(traced))
    except Exception as exc:  # any failure to script it: the graph in one piece
        log.info("scoring batches in one piece: the slice loop could not be scripted (%s)", exc)
        return lambda raw, center, scale, rows: traced(raw, center, scale)


def _rows(raw: torch.Tensor, center: torch.Tensor, scale: torch.Tensor, index: torch.Tensor):
    """Rows `index` of the inputs (cycling through each one's rows); a center or scale of one row
    broadcasts over the inputs, and stays as it is."""
    return tuple(t[index % len(t)] if t is raw or len(t) > 1 else t for t in (raw, center, scale))
