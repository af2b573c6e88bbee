r"""Sampling noise addressed by sample index, so that chunked sampling equals unchunked sampling.

``sample_chunked(n, chunk_size, generator)`` calls ``generate`` once per chunk. With plain
``torch.randn(..., generator=g)`` the noise of sample ``i`` depends on how the earlier samples were
chunked (the generator's stream is consumed chunk by chunk, and torch's CPU normal sampler even draws
differently below 16 values), so the same seed gave different samples at different chunk sizes.

:class:`IndexedNoise` draws one 62-bit key from the caller's generator. The noise of draw ``c`` (the
c-th ``randn`` call inside ``generate``) comes in aligned blocks of ``BLOCK`` samples; block ``b`` is
``torch.randn`` from a generator seeded with a hash of ``(key, c, b)``, and a chunk slices the blocks it
overlaps. Sample ``i``'s noise is therefore a pure function of ``(key, c, i)``, so chunk boundaries cannot
change it, at the cost of at most two partly used blocks per chunk (torch's fast sampler, not a per-value
hash: the counter-based ``hashed_normal`` is ~40x slower on images). A draw whose size is not the chunk's (a plugin that
draws, say, ``2 n`` candidates) cannot be addressed by sample index; it is keyed by ``(c, chunk start,
size)`` instead: still fresh noise, never shared between chunks, but not chunk-independent.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_KEY_BITS = 62
BLOCK = 256
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
        if n != self.size:  # not addressable by sample index: a key of its own per (draw, chunk, size)
            return self._normal((n, *shape), (key * 1_000_003 + self.start * 7919 + n) % 2**_KEY_BITS)
        first, last = self.start // BLOCK, (self.start + n - 1) // BLOCK
        blocks = [self._normal((BLOCK, *shape), (key + (b + 1) * 0xBF58476D1CE4E5B9) % 2**_KEY_BITS)
                  for b in range(first, last + 1)]
        offset = self.start - first * BLOCK
        return torch.cat(blocks)[offset:offset + n]

    def _normal(self, size: Sequence[int], seed: int) -> Tensor:
        generator = torch.Generator(device=self.generator.device).manual_seed(seed)
        return torch.randn(tuple(size), generator=generator, device=self.generator.device)
