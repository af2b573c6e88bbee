r"""Sampling noise addressed by sample index, so that chunked sampling equals unchunked sampling.

``sample_chunked(n, chunk_size, generator)`` calls ``generate`` once per chunk. With plain
``torch.randn(..., generator=g)`` the noise of sample ``i`` depends on how the earlier samples were
chunked (the generator's stream is consumed chunk by chunk, and torch's CPU normal sampler even draws
differently below 16 values), so the same seed gave different samples at different chunk sizes.

:class:`IndexedNoise` draws one 62-bit key from the caller's generator and defines the noise of draw
``c`` (the c-th ``randn`` call inside ``generate``) for sample ``i`` as the counter-based Gaussian
``hashed_normal(i; key_c)`` (:func:`~onestep.generators.coupling.hashed_normal`): a pure function of
``(key, c, i)``, so chunk boundaries cannot change it. A draw whose size is not the chunk's (a plugin that
draws, say, ``2 n`` candidates) cannot be addressed by sample index; it is keyed by ``(c, chunk start,
size)`` instead: still fresh noise, never shared between chunks, but not chunk-independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from onestep.generators.coupling import hashed_normal

_KEY_BITS = 62
_CALL_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio increment: distinct, well-mixed keys per draw


class IndexedNoise:
    """Chunk-independent standard normal noise for one ``sample_chunked`` call."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self.key = int(torch.randint(0, 2**_KEY_BITS, (1,), generator=generator, device=generator.device))
        self.start, self.size, self.calls = 0, 0, 0

    def begin_chunk(self, start: int, size: int) -> None:
        """The next ``generate`` call produces samples ``start .. start + size - 1``."""
        self.start, self.size, self.calls = start, size, 0

    def draw(self, n: int, shape: Sequence[int]) -> Tensor:
        """``(n, *shape)`` standard normal values on the generator's device."""
        key = (self.key + self.calls * _CALL_STRIDE) % 2**_KEY_BITS
        self.calls += 1
        device = self.generator.device
        if n == self.size:
            return hashed_normal(torch.arange(self.start, self.start + n, device=device), shape, key)
        # not addressable by sample index: a key of its own per (draw, chunk, size)
        key = (key * 1_000_003 + self.start * 7919 + n) % 2**_KEY_BITS
        return hashed_normal(torch.arange(n, device=device), shape, key)
