"""The one way lightning_sofo derives a seed from several keys: the tangents of a SOFO step
(seed, step, stream), a task's batches (seed, stream, index, rank) and a model's noise
(noise seed, step, rank, stream) are each seeded by `mixed_seed` of their keys.

    mixed_seed(k_1, ..., k_n) = (sum_i k_i * C_i + offset) mod (2^63 - 1)

with the odd 64-bit constants C_i of splitmix64 and the golden ratio, so that keys that differ in
any position give unrelated torch seeds. numpy's SeedSequence would do the same job; this mixing
is kept because every saved run of the training study (benchmarks/training_quality) drew its
tangents and trials from it, and the study compares new runs with saved ones on the same trials.
"""

from __future__ import annotations

import zlib

MULTIPLIERS = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)
MODULUS = 2**63 - 1


def mixed_seed(*keys: int | str, offset: int = 0) -> int:
    """A seed in [0, 2^63 - 1) that is a pure function of up to four keys (ints, or strings, which
    count by their CRC-32) and `offset`."""
    if len(keys) > len(MULTIPLIERS):
        raise ValueError(f"mixed_seed takes at most {len(MULTIPLIERS)} keys, got {len(keys)}.")
    numbers = [zlib.crc32(key.encode()) if isinstance(key, str) else int(key) for key in keys]
    return (sum(k * c for k, c in zip(numbers, MULTIPLIERS)) + offset) % MODULUS
