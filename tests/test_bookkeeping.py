"""core.bookkeeping.StepRecorder: the figures written per step, in one process and across torchrun ranks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from core import runs
from core.bookkeeping import ProgressBar, StepRecorder
from core.distributed import Distributed


@dataclass(frozen=True)
class _WithOtherRank(Distributed):
    """Rank 0 of 2, whose all-reduce adds what the other rank holds."""

    other: tuple = ()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values + torch.tensor(self.other, dtype=values.dtype)


def _record(tmp_path, dist: Distributed, loss: float, hits: int, n: int) -> tuple[float, int, int]:
    recorder = StepRecorder(tmp_path, 1, ProgressBar(False, 1, 0, ""), 1, 1, dist=dist)
    recorder.add(0, torch.tensor(loss), torch.tensor(hits), n, 0.1)
    (figures,) = recorder.flush(0, 1, {})
    return figures


def test_one_process_writes_its_step_as_it_was(tmp_path):
    assert _record(tmp_path, Distributed(), 0.7, 3, 4) == (pytest.approx(0.7), 3, 4)
    (record,) = runs.step_metrics(tmp_path).to_dict("records")
    assert record["loss"] == pytest.approx(0.7) and record["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("mine, other", [((0.9, 2, 3), (0.3, 1, 1)), ((0.0, 0, 0), (1.2, 1, 1))])
def test_uneven_shares_of_a_step_record_the_whole_batchs_loss(tmp_path, mine, other):
    """Each rank's WholeBatchLoss is its part of the whole batch's loss x world, so the step's loss is the ranks'
    mean whatever their image counts (an image-weighted mean would write 0.75 and 1.2 here); hits and images add."""
    loss, hits, n = _record(tmp_path, _WithOtherRank(0, 2, other=other[:2] + (other[2],)), *mine)
    assert loss == pytest.approx((mine[0] + other[0]) / 2)
    assert (hits, n) == (mine[1] + other[1], mine[2] + other[2])
