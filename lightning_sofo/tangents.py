"""Tangents: the K random directions in parameter space that a SOFO step explores (docs/math.md,
sections 1 and 7).

V = [v_1 .. v_K] is a P x K matrix (P numbers in the parameters theta), by default with
orthonormal columns (V^T V = I_K, the Q of a Gaussian matrix's reduced QR); the options of
SOFO draw some columns per block of parameters, cycle through an orthonormal basis, or only
scale them to unit length. Here they are built as (P, K) column matrices and split per
parameter into a tangent dict {name: (K, *parameter.shape)}, contiguous, in the parameters'
dtype and on their device. The random draws come from step_generator(seed, step), a pure
function of the seed and the iteration, so a run's tangents are the same on every process and
after a resume.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import torch
from torch import Tensor

from lightning_sofo.seeds import mixed_seed
from lightning_sofo.sketch import Params


def usable_tangent_count(params: Params, tangents: int, reserved: int = 0) -> int:
    """K clamped to P - reserved (more than P orthonormal directions do not exist; `reserved`
    columns are taken by other directions, e.g. SOFO's memory), with a warning."""
    num_params = sum(p.numel() for p in params.values())
    if tangents + reserved <= num_params:
        return tangents
    k = num_params - reserved
    if k < 1:
        raise ValueError(f"SOFO: {reserved} memory and gradient directions leave no room for random tangents among "
                         f"the P={num_params} parameters; lower memory.")
    if reserved:
        message = (f"tangents={tangents} plus {reserved} memory and gradient directions is more than the "
                   f"P={num_params} parameters; using K=P-{reserved}={k} random tangents (a full-rank Gauss-Newton step).")
    else:
        message = (f"tangents={tangents} is larger than the number of parameters P={num_params}; "
                   f"using K=P={num_params} (a full-rank Gauss-Newton step).")
    warnings.warn(f"SOFO: {message}", stacklevel=3)
    return k


def in_block(name: str, prefix: str) -> bool:
    """True if parameter `name` belongs to the block `prefix`: the name itself or "prefix.*"."""
    return name == prefix or name.startswith(prefix + ".")


def sample_tangents(params: Params, tangents: int, generator: torch.Generator) -> dict[str, Tensor]:
    """K orthonormal directions in parameter space, split per parameter.

    Draws a Gaussian P x K matrix from `generator` and orthonormalises its columns
    (reduced QR), so that V^T V = I_K. Returns {name: (K, *param.shape)}, each
    contiguous, in the parameters' dtype and on their device.
    """
    k = usable_tangent_count(params, tangents)
    return split_tangents(params, orthonormal_columns(gaussian_columns(params, k, generator)))


def gaussian_columns(params: Params, k: int, generator: torch.Generator) -> Tensor:
    """(P, k) standard normal entries, in the parameters' dtype and on their device."""
    first = next(iter(params.values()))
    num_params = sum(p.numel() for p in params.values())
    return torch.randn(num_params, k, generator=generator, device=first.device, dtype=first.dtype)


def block_columns(params: Params, blocks: Mapping[str, int], generator: torch.Generator) -> Tensor:
    """(P, sum of counts) Gaussian columns each supported on one block of parameters.

    blocks: {name prefix: count}; a block is every parameter whose name is the prefix
    or starts with "prefix." (so "cell" means all of cell.*), and gets `count` columns
    that are zero outside it: directions that move that block alone.
    """
    first = next(iter(params.values()))
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    columns = []
    for prefix, count in blocks.items():
        rows = torch.zeros(start, dtype=torch.bool, device=first.device)
        for name, (lo, hi) in offsets.items():
            if in_block(name, prefix):
                rows[lo:hi] = True
        block = torch.randn(start, count, generator=generator, device=first.device, dtype=first.dtype)
        columns.append(block * rows[:, None])
    return torch.cat(columns, dim=1) if columns else first.new_zeros(start, 0)


def cycle_columns(num_params: int, k: int, cycle_length: int, step: int, seed: int,
                  like: Tensor, cache: dict | None = None) -> Tensor:
    """(P, k) orthonormal columns, orthogonal to those of the other steps of the same cycle.

    Steps c*s .. c*s + c - 1 (c = cycle_length) share one orthonormal P x (c k) basis,
    drawn from (seed, cycle index s): step j of the cycle takes its j-th block of k
    columns, so a cycle explores c k distinct directions (all of them when c k = P)
    before it starts again (the SOFO authors' reach examples). The basis is a pure
    function of (seed, cycle), kept in `cache` between the steps of a cycle.
    """
    cycle, position = divmod(step, cycle_length)
    key = (seed, cycle, num_params, k, cycle_length, like.dtype, like.device)
    if cache is None or cache.get("key") != key:
        if cache is not None:
            cache.clear()  # free the last cycle's basis before drawing the next
        generator = step_generator(seed, cycle, like.device, stream=1)
        gaussian = torch.randn(num_params, cycle_length * k, generator=generator, device=like.device, dtype=like.dtype)
        basis = torch.linalg.qr(gaussian)[0]
        if cache is None:
            return basis[:, position * k:(position + 1) * k]
        cache.update(key=key, basis=basis)
    return cache["basis"][:, position * k:(position + 1) * k]


def orthonormal_columns(columns: Tensor) -> Tensor:
    """Q of the reduced QR of (P, K) columns: orthonormal, and the first j columns of Q span
    the first j given columns (so directions placed first are kept exactly)."""
    return torch.linalg.qr(columns)[0]


def unit_norm_columns(columns: Tensor) -> Tensor:
    """(P, K) columns each scaled to unit length, not orthogonalised: the SOFO authors' own tangent
    distribution (Gaussian columns / their norms). With K << P they are nearly orthogonal
    already (|v_i . v_j| ~ 1 / sqrt(P)); a zero column stays zero."""
    norms = torch.linalg.vector_norm(columns, dim=0, keepdim=True)
    return columns / torch.where(norms > 0, norms, torch.ones_like(norms))


TANGENT_BASES = {"orthonormal": orthonormal_columns, "unit_norm": unit_norm_columns}


def split_tangents(params: Params, basis: Tensor) -> dict[str, Tensor]:
    """(P, K) columns -> {name: (K, *param.shape)}, contiguous."""
    k = basis.shape[1]
    chunks = basis.T.split([p.numel() for p in params.values()], dim=1)  # each (K, numel)
    return {name: chunk.reshape(k, *p.shape).contiguous() for (name, p), chunk in zip(params.items(), chunks)}


def flatten_directions(params: Params, directions: Mapping[str, Tensor]) -> Tensor:
    """{name: (m, *param.shape)} -> (P, m), the inverse of split_tangents."""
    return torch.cat([directions[name].reshape(directions[name].shape[0], -1) for name in params], dim=1).T


def step_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """The tangent generator of iteration `step`: a pure function of (seed, step) (and of
    `stream`, which separates independent uses of the same step, e.g. tangent cycles).

    Seeding per step makes the tangents independent of everything but the seed and
    the step count (resumable from a checkpoint, identical on every process).
    """
    return torch.Generator(device=device).manual_seed(mixed_seed(seed, step, stream, offset=1))


def count_tangents(tangents: Params) -> int:
    """K, the leading dimension of a tangent dict."""
    return next(iter(tangents.values())).shape[0]
