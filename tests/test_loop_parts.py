"""The training loop's small parts, in-process: the stop requests (Ctrl-C / SIGTERM) and the
non-finite loss watch."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fastibd.errors import UserError
from fastibd.train.meter import LossWatch
from fastibd.train.stopping import EXIT_CODES, Stopped, StopRequests


def test_a_first_signal_is_recorded_and_a_second_one_interrupts() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopRequests() as stops:
        assert stops.signum is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before returning
        assert stops.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert stops.signum == signal.SIGTERM  # the first one is what the exit code says
    assert signal.getsignal(signal.SIGTERM) is before  # restored
    assert EXIT_CODES[signal.SIGTERM] == 143 and EXIT_CODES[signal.SIGINT] == 130
    assert str(Stopped(signal.SIGINT)) == "SIGINT"


def test_the_loss_watch_names_the_first_bad_step() -> None:
    watch = LossWatch(torch.device("cpu"), "(hint)")
    assert watch.every == 1  # on a CPU every step is checked: no GPU to keep busy
    watch.add(0, torch.tensor(1.0), epoch=0)
    with pytest.raises(UserError, match=r"became nan at epoch 3, step 5; stopped without "
                                        r"saving \(hint\)"):
        watch.add(4, torch.tensor(float("nan")), epoch=2)
    gpu_like = LossWatch(torch.device("meta"), "")
    assert gpu_like.every == 25
    for index in range(3):  # under `every` steps: nothing is checked yet
        gpu_like.add(index, torch.tensor(float("inf") if index == 1 else 0.0), epoch=0)
    with pytest.raises(UserError, match="became inf at epoch 1, step 2"):
        gpu_like.check(epoch=0)
    gpu_like.check(epoch=0)  # the window was emptied by the check


def test_the_loss_watch_stops_every_rank_when_one_sees_a_bad_loss(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP the ranks agree: one that raised alone left the others waiting forever."""
    from fastibd.distributed import World
    from fastibd.train import meter

    reduced: list[float] = []

    def elsewhere_bad(values: torch.Tensor, world: World) -> torch.Tensor:
        reduced.append(float(values.sum()))
        return values + 1  # another rank's loss was not finite

    monkeypatch.setattr(meter, "all_reduce_sum", elsewhere_bad)
    watch = LossWatch(torch.device("cpu"), "(hint)", World(rank=1, size=2, distributed=True))
    with pytest.raises(UserError, match="non-finite on another process during epoch 2"):
        watch.add(0, torch.tensor(1.0), epoch=1)
    assert reduced == [0.0]  # this rank said its own loss was finite
