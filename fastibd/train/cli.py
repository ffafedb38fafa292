"""`python -m fastibd.train --cfg NAME [--section.key=value ...]`: read the configuration,
start one process per GPU when there are several (torchrun), build the Trainer and fit."""

from __future__ import annotations

import sys

from fastibd.config import as_dict, help_text, load_config
from fastibd.distributed import process_count, relaunch, shutdown
from fastibd.errors import exit_on_user_error
from fastibd.train.trainer import Trainer


@exit_on_user_error("fastibd.train")
def run(argv: list[str]) -> int:
    config = load_config(argv)
    settings = as_dict(config)
    nproc = process_count(settings["training"])
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
