"""How every seed of a run is derived from the seeds a user sets, in one place.

A user sets a few seeds (``--seed_everything``, ``--model.noise_seed``, ``--model.inference.seed``, ...); each random
draw that must not depend on the global RNG's history (training noise per batch, the data order per epoch, the
noise of each ensemble member, the validation noise) gets its own generator seeded by ``derive_seed``. Draws at
different counters, or in different streams at the same counters, get different seeds.
"""

_PRIME = 1_000_003  # folds a counter into a seed: s -> s * P + c
_STREAMS = 7  # independent streams per counter tuple: s -> s * 7 + stream, stream in [0, 7)


def derive_seed(seed: int, *counters: int, stream: int | None = None) -> int:
    """The seed of one draw: ``seed`` folded with each counter (batch, epoch, ensemble member, ...), then the
    ``stream`` (e.g. initial noise vs DDIM's eta noise of the same member; a generalist's tasks) when given.

    >>> derive_seed(0, 5), derive_seed(2, 5), derive_seed(2, 5, stream=1)
    (5, 2000011, 14000078)
    """
    if stream is not None and not 0 <= stream < _STREAMS:
        raise ValueError(f"stream must be in [0, {_STREAMS}), got {stream}")
    s = seed
    for counter in counters:
        s = s * _PRIME + counter
    if stream is not None:
        s = s * _STREAMS + stream
    return s % 2**63
