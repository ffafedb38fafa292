"""Seeds derived from a run's seed: independent streams for each (epoch, batch, restart)."""

from __future__ import annotations

import numpy as np


def derived_seed(seed: int, *keys: int) -> int:
    """A seed for one piece of work (e.g. one batch of one epoch), independent of every
    other combination of `keys`, reproducible from `seed`."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])
