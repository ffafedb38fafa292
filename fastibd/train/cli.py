"""`python -m fastibd.train --cfg NAME [--section.key=value ...]`: read the configuration,
start one process per GPU when there are several (torchrun), build the Trainer and fit."""

from __future__ import annotations

import sys

from fastibd.distributed import process_count, relaunch, shutdown
from fastibd.errors import exit_on_user_error
from fastibd.train.settings import help_text, load_settings
from fastibd.train.trainer import Trainer


@exit_on_user_error("fastibd.train")
def run(argv: list[str]) -> int:
    settings = load_settings(argv)
    nproc = process_count(settings.training.nproc, settings.training.device,
                          settings.optim.lr_scaling)
    if nproc > 1:
        relaunch(argv, nproc)
    trainer = Trainer(settings)
    try:
        return trainer.fit()
    finally:
        shutdown(trainer.world)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text())
        return 0
    return run(argv)
