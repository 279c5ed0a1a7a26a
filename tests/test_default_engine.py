"""The default engine (compile_steps="auto"): long trials run compiled without any setting, short
ones eagerly, with the same sketches; a compilation that fails falls back to the eager engine with
one warning, while an error of the model's own still surfaces."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import module_tangents

from lightning_sofo import SOFODDPStrategy, SOFOEngine, SOFOStrategy
from lightning_sofo import timeloop
from lightning_sofo.timeloop import AUTO_COMPILE_MIN_STEPS, AUTO_COMPILE_WINDOW, resolve_compile_steps
from lightning_sofo.models import VanillaRNN


@pytest.fixture()
def compile_calls(monkeypatch):
    """Count torch.compile calls; each test starts with no compiled engine in this process."""
    calls = []
    real = torch.compile

    def counted(function, **kwargs):
        calls.append(function.__name__)
        return real(function, **kwargs)

    timeloop.clear_compiled()
    monkeypatch.setattr(torch, "compile", counted)
    yield calls
    timeloop.clear_compiled()


def test_auto_compiles_long_trials_and_runs_short_ones_eagerly():
    assert resolve_compile_steps("auto", AUTO_COMPILE_MIN_STEPS) == AUTO_COMPILE_WINDOW
    assert resolve_compile_steps("auto", AUTO_COMPILE_MIN_STEPS - 1) == 0
    assert resolve_compile_steps(7, 10_000) == 7 and resolve_compile_steps(0, 10_000) == 0
    assert SOFOEngine().compile_steps == "auto", "the default"
    assert SOFOStrategy().engine.compile_steps == "auto" and SOFODDPStrategy().engine.compile_steps == "auto"


def sketch(model, steps, compile_steps, **settings):
    torch.manual_seed(1)
    inputs, targets = torch.randn(3, steps, 2), torch.randn(3, steps, 2)
    optimizer, tangents = module_tangents(model, 6)
    engine = SOFOEngine(compile_steps=compile_steps, **settings)
    return engine.sketch_function(model, (inputs, targets, None), optimizer)(tangents)


def test_the_default_engine_is_compiled_for_long_trials_with_the_eager_sketches(compile_calls):
    torch.manual_seed(0)
    model = VanillaRNN(2, 8, 2)
    short = sketch(model, 40, "auto")
    assert compile_calls == [], "a short trial runs eagerly"
    eager, default = sketch(model, 110, 0), sketch(model, 110, "auto")
    assert compile_calls == ["_sketch_steps"], "a long trial runs compiled, with no setting"
    for a, b in ((default.grad, eager.grad), (default.ggn, eager.ggn), (default.loss, eager.loss)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert short.grad.shape == (6,)


def test_a_failed_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken_compile(function, **kwargs):
        def fails(*args):
            raise RuntimeError("no C compiler found (simulated)")
        return fails

    timeloop.clear_compiled()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        torch.manual_seed(0)
        model = VanillaRNN(2, 8, 2)
        eager = sketch(model, 110, 0)
        with pytest.warns(RuntimeWarning, match="could not compile.*no C compiler found.*runs eagerly"):
            fallback = sketch(model, 110, "auto")
        torch.testing.assert_close(fallback.ggn, eager.ggn, rtol=1e-5, atol=1e-8)  # summed window by window
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once only
            sketch(model, 110, "auto")
    finally:
        timeloop.clear_compiled()


class Broken(VanillaRNN):
    def step(self, state, inputs_t):
        raise ValueError("the model's own bug")


def test_an_error_of_the_model_is_raised_not_taken_for_a_compiler_failure(compile_calls):
    model = Broken(2, 8, 2)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError, match="the model's own bug"):
        warnings.simplefilter("always")
        sketch(model, 110, "auto")
    assert not [w for w in caught if "could not compile" in str(w.message)], "not reported as the compiler's"


def test_cuda_graph_mode_falls_back_cleanly_on_a_cpu(compile_calls):
    """compile_mode="reduce-overhead" (CUDA graphs on a GPU) runs on a CPU as the default mode
    does, with the same sketches; a mode that torch.compile does not know is refused clearly."""
    torch.manual_seed(0)
    model = VanillaRNN(2, 8, 2)
    eager, graphed = sketch(model, 110, 0), sketch(model, 110, "auto", compile_mode="reduce-overhead")
    assert compile_calls == ["_sketch_steps"]
    torch.testing.assert_close(graphed.ggn, eager.ggn, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="compile_mode is one of"):
        SOFOStrategy(compile_mode="fast")


class PrecisionSpy(VanillaRNN):
    """Records torch's CUDA float32 matmul precision at every step it runs; fails on demand."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen, self.fail = [], False

    def step(self, state, inputs_t):
        self.seen.append(torch.backends.cuda.matmul.fp32_precision)
        if self.fail:
            raise RuntimeError("a failing step")
        return super().step(state, inputs_t)


def legacy_precision() -> str:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "refused"


@pytest.mark.parametrize("before", ["none", "ieee", "tf32"])
def test_tf32_is_scoped_to_the_sofo_step_and_changes_nothing_on_a_cpu(before):
    """allow_tf32=True runs the model's passes of a SOFO step with TF32 CUDA matmuls and gives the
    program's own setting back after (also after an error; an explicit "tf32" is left as it is);
    on a CPU the sketches are bit for bit those without it."""
    matmul = torch.backends.cuda.matmul
    original = matmul.fp32_precision
    try:
        matmul.fp32_precision = before
        legacy = legacy_precision()
        torch.manual_seed(0)
        model = PrecisionSpy(2, 8, 2)
        with_tf32 = sketch(model, 5, 0, allow_tf32=True)
        assert set(model.seen) == {"tf32"}, "every step ran under TF32"
        assert matmul.fp32_precision == before, "restored after the step"
        assert legacy_precision() == legacy, "torch's legacy getter answers as before (it refuses a mix of APIs)"
        model.seen = []
        without = sketch(model, 5, 0)
        assert set(model.seen) == {before}, "without the option the program's setting holds"
        for field in ("loss", "grad", "ggn"):
            assert torch.equal(getattr(with_tf32, field), getattr(without, field)), field
        model.fail = True
        with pytest.raises(RuntimeError, match="a failing step"):
            sketch(model, 5, 0, allow_tf32=True)
        assert matmul.fp32_precision == before, "restored after an error"
    finally:
        matmul.fp32_precision = original


def test_allow_tf32_is_checked():
    assert SOFOEngine().allow_tf32 is False, "off by default"
    with pytest.raises(ValueError, match="allow_tf32 must be True or False"):
        SOFOStrategy(allow_tf32="yes")
    with pytest.raises(ValueError, match="accumulate_float64 must be True or False"):
        SOFOEngine(accumulate_float64=1)


@pytest.mark.parametrize("damping", [1e-3, "adaptive"])  # adaptive also runs the loss alone, in the same windows
def test_a_new_trial_length_reuses_the_compiled_window(damping):
    """Windows are compiled for their own shape: a trial of another length (a different stride of the
    whole trial's tensors, and a shorter last window, which runs eagerly) compiles nothing new, so
    varying T inside one process costs no compilation. torch's public fail_on_recompile stance turns a
    recompilation into an error, which the engine would report as a compilation failure."""
    from conftest import TinyRNN

    from lightning_sofo import SOFO

    timeloop.clear_compiled()
    torch.compiler.reset()
    model = TinyRNN()
    optimizer = SOFO(model.parameters(), tangents=4, damping=damping)
    engine = SOFOEngine(compile_steps=10)

    def step(horizon):
        batch = {"inputs": torch.randn(3, horizon, 2), "targets": torch.randn(3, horizon, 2),
                 "mask": (torch.rand(3, horizon, 1) > 0.3).float()}
        optimizer.step(engine.sketch_function(model, batch, optimizer))

    step(20)
    try:
        torch.compiler.set_stance("fail_on_recompile")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the engine's "could not compile" warning would fail the test
            for horizon in (30, 45, 100):
                step(horizon)
    finally:
        torch.compiler.set_stance("default")
        timeloop.clear_compiled()


def test_on_a_cpu_only_the_sketch_compiles_and_the_eager_loss_sees_its_noise(compile_calls):
    """The loss alone (adaptive damping's check of a step) runs eagerly on a CPU, so a run compiles
    one graph, not two; it must score the same noisy loss as the compiled sketch of the same step."""
    torch.manual_seed(0)
    model = VanillaRNN(2, 8, 2, recurrent_noise=0.3, input_noise=0.2, output_noise=0.1)
    model.train()
    inputs, targets = torch.randn(3, 110, 2), torch.randn(3, 110, 2)
    optimizer, tangents = module_tangents(model, 6)
    closure = SOFOEngine().sketch_function(model, (inputs, targets, None), optimizer)
    sketch, loss = closure(tangents), closure(None)
    assert compile_calls == ["_sketch_steps"], "the loss alone runs eagerly on a CPU"
    torch.testing.assert_close(loss, sketch.loss)
