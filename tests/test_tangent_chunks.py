"""Tangent chunks (tangent_chunk): the forward-mode pass runs c of the K tangents at a time, so
that on a CPU a step's K-batched arrays stay in cache; the sketches must be exactly those of all K
tangents at once, eagerly and compiled, for every kind of loss, with noise, and in float64
accumulation. The oracle is the unchunked engine, itself checked against reverse mode and the
explicit Gauss-Newton matrix elsewhere (test_sketches, test_functional)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_noisy_sketch_matches_reverse_mode, module_tangents

from lightning_sofo import SOFOEngine, SOFOStrategy
from lightning_sofo.timeloop import AUTO_CHUNK_BYTES, AUTO_CHUNK_MIN, resolve_tangent_chunk
from lightning_sofo.models import VanillaRNN


def sketches(model, batch, k, chunks, **settings):
    """{chunk: Sketch} of one SOFO iteration on `batch`, for each tangent chunk size, by an engine
    with the other `settings`."""
    optimizer, tangents = module_tangents(model, k)
    return {chunk: SOFOEngine(tangent_chunk=chunk, **settings).sketch_function(model, batch, optimizer)(tangents)
            for chunk in chunks}


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.ggn, b.ggn, rtol=rtol, atol=atol)


def batch(steps, mask=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    inputs, targets = torch.randn(4, steps, 2, generator=g), torch.randn(4, steps, 2, generator=g)
    return inputs, targets, ((torch.rand(4, steps, 1, generator=g) > 0.3).float() if mask else None)


@pytest.mark.parametrize("compile_steps", [0, 10])
def test_chunked_sketches_equal_all_tangents_at_once(compile_steps):
    """K = 10 in chunks of 3 (a shorter last chunk), and eagerly also 5 and K or more, over 45 steps
    (windows of 10 and a shorter last one when compiled; blocks of 32 eagerly), masked MSE."""
    torch.manual_seed(0)
    model = VanillaRNN(2, 8, 2)
    chunks = (3, 5, 10, 64) if compile_steps == 0 else (3,)  # compiled: each chunk shape is a compilation
    result = sketches(model, batch(45), 10, [0, *chunks], compile_steps=compile_steps)
    for chunk in chunks:
        assert_same(result[chunk], result[0])
    assert result[0].ggn.shape == (10, 10)


def test_chunks_with_rate_penalty_cross_entropy_and_float64_accumulation():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    inputs, labels = torch.randn(4, 40, 2, generator=g), torch.randint(0, 3, (4, 40), generator=g)
    model = VanillaRNN(2, 8, 3, loss="cross_entropy", rate_l2=0.1)
    result = sketches(model, (inputs, labels, None), 9, [0, 4], compile_steps=0, accumulate_float64=True)
    assert result[4].ggn.dtype == torch.float64
    assert_same(result[4], result[0])


def test_chunks_with_a_loss_over_the_whole_trial():
    """A user loss that is not a per-step sum gets the stacked outputs of all K tangents."""
    torch.manual_seed(0)

    def last_step_loss(outputs, targets, mask):
        return ((outputs[:, -1] - targets[:, -1]) ** 2).mean()

    model = VanillaRNN(2, 8, 2, loss=last_step_loss)
    result = sketches(model, batch(30, mask=False), 8, [0, 3], compile_steps=0)
    assert_same(result[3], result[0])


@pytest.mark.parametrize("compile_steps", [0, 10])
def test_chunks_draw_the_same_noise_for_every_tangent(compile_steps):
    """Each chunk repeats the primal pass; a noisy network must see one noise draw in all of them,
    so the chunked sketch is still the derivative of one noisy loss (checked by reverse mode, whose
    eager forward pass draws the noise the compiled windows draw too)."""
    torch.manual_seed(0)
    model = VanillaRNN(2, 8, 2, recurrent_noise=0.3, input_noise=0.2, output_noise=0.1)
    model.train()
    data = batch(40)
    result = sketches(model, data, 8, [0, 4], compile_steps=compile_steps)
    assert_same(result[4], result[0])
    optimizer, tangents = module_tangents(model, 8)
    assert_noisy_sketch_matches_reverse_mode(model, data, optimizer, tangents,
                                             SOFOEngine(tangent_chunk=4, compile_steps=compile_steps))


def test_compiled_and_eager_windows_draw_the_same_noise():
    """torch falls back to eager code for a compiled function that reaches its recompilation limit,
    silently and per shape, so one step's tangent chunks may run some compiled and some eagerly: the
    two must draw the same noise, or the chunks would differentiate different noisy losses."""
    torch.manual_seed(0)
    model = VanillaRNN(2, 8, 2, recurrent_noise=0.3, input_noise=0.2, output_noise=0.1)
    model.train()
    data = batch(40)
    compiled = sketches(model, data, 10, [0, 4], compile_steps=10)
    eager = sketches(model, data, 10, [0, 4], compile_steps=0)
    assert_same(compiled[0], eager[0])
    assert_same(compiled[4], eager[4])


def test_auto_chunks_on_a_cpu_fit_the_cache_and_leave_small_states_whole():
    def state(batch_size, units, device="cpu"):
        return torch.zeros(batch_size, units, device=device)

    # B 64, N 64 float32: 16 KiB per tangent, 32 tangents fill 512 KiB
    assert resolve_tangent_chunk("auto", state(64, 64), 128) == 32
    assert 32 * 64 * 64 * 4 <= AUTO_CHUNK_BYTES < 64 * 64 * 64 * 4
    assert resolve_tangent_chunk("auto", state(64, 1024), 128) == AUTO_CHUNK_MIN, "never fewer than the minimum"
    assert resolve_tangent_chunk("auto", state(16, 32), 32) == 0, "small states run all K at once"
    assert resolve_tangent_chunk("auto", (state(64, 64), state(64, 64)), 128) == 16, "every leaf of the state counts"
    assert resolve_tangent_chunk("auto", state(64, 64, device="meta"), 128) == 0, "not on a CPU: all K at once"
    assert resolve_tangent_chunk(7, state(64, 64), 128) == 7 and resolve_tangent_chunk(0, state(64, 64), 128) == 0
    assert resolve_tangent_chunk(128, state(64, 64), 128) == 0, "a chunk of K or more is all K at once"


def test_tangent_chunk_is_checked_and_defaults_to_auto():
    assert SOFOEngine().tangent_chunk == "auto" and SOFOStrategy().engine.tangent_chunk == "auto"
    with pytest.raises(ValueError, match="tangent_chunk must be an integer >= 0"):
        SOFOEngine(tangent_chunk=-1)
    with pytest.raises(ValueError, match="tangent_chunk must be an integer >= 0"):
        SOFOStrategy(tangent_chunk="half")
