"""Functional calls of a module's methods, and the check that they are pure.

SOFO differentiates `initial_state`, `step` and `forward` with respect to parameters passed in
(torch.func.functional_call under jvp and vmap), so those methods must be pure functions of the
parameters and buffers: no in-place writes, no running statistics.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn
from torch.func import functional_call

from lightning_sofo.timeloop import step_through


class _Method(nn.Module):
    """Calls one method of a module, so torch.func.functional_call can swap its parameters."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, *args):
        return getattr(self.module, self.method)(*args)


class _Window(nn.Module):
    """Calls a step method of a module over the steps of a window, so that functional_call swaps
    the parameters in once for all of them."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module = module
        self.method = method

    def forward(self, state: Any, inputs: Tensor) -> tuple[Any, Any]:
        return step_through(getattr(self.module, self.method), state, inputs)


METHODS = ("initial_state", "step", "step_with_rates", "forward")


class _CallsOfOneModule(dict):
    """The functional calls built for one module, kept in its __dict__: never copied or pickled
    with it (their closures hold the module they were built for), so a copy builds its own."""

    def __reduce__(self):
        return (_CallsOfOneModule, ())

    def __deepcopy__(self, memo: dict) -> "_CallsOfOneModule":
        return _CallsOfOneModule()


def functional(module: nn.Module, method: str) -> Callable[..., Any]:
    """`functional_method(module, method)`, built once per module and method (one of METHODS), so
    that torch.compile's guards on it hold from one iteration to the next."""
    calls = module.__dict__.setdefault("_functional_calls", _CallsOfOneModule())
    if method not in calls:
        if method not in METHODS:
            raise ValueError(f"functional calls are built for {METHODS}, not {method!r}.")
        calls[method] = functional_method(module, method)
    return calls[method]


def functional_method(module: nn.Module, method: str) -> Callable[..., Any]:
    """f(params, *args) = module.<method>(*args) with the parameters replaced by `params`.

    f.window(params, state, inputs (B, W, I)) -> (state, outputs (B, W, O)) runs a step method
    over W steps with the parameters swapped in once (timeloop.step_loop uses it)."""
    def swapped(params: dict[str, Tensor]) -> dict[str, Tensor]:
        return {f"module.{name}": p for name, p in params.items()}

    wrapper, window = _Method(module, method), _Window(module, method)

    def call(params: dict[str, Tensor], *args: Any) -> Any:
        return functional_call(wrapper, swapped(params), args)

    def call_window(params: dict[str, Tensor], state: Any, inputs: Tensor) -> tuple[Any, Any]:
        return functional_call(window, swapped(params), (state, inputs))

    call.window = call_window
    return call


class PureFunctionCheck:
    """Turns the symptoms of a module that is not a pure function of its parameters
    into an error that names the cause: batch norm in train mode, or in-place
    writes to parameters or buffers during the forward pass."""

    def __init__(self, module: nn.Module, primals: dict[str, Tensor]):
        self.module = module
        self.tensors = {**dict(module.named_buffers()), **primals}

    def __enter__(self):
        for name, sub in self.module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.training and sub.track_running_stats:
                raise RuntimeError(
                    f"SOFO needs the loss to be a pure function of the parameters, but {name or 'the module'} is a "
                    f"{type(sub).__name__} in train mode, which updates its running statistics in place. "
                    "Use track_running_stats=False, put it in eval mode, or use a normalisation without state "
                    "(LayerNorm, GroupNorm)."
                )
        self.versions = {name: t._version for name, t in self.tensors.items()}
        return self

    def __exit__(self, exc_type, exc, tb):
        changed = [name for name, t in self.tensors.items() if t._version != self.versions[name]]
        if changed or (exc_type is RuntimeError and "inplace" in str(exc).replace("-", "").lower()):
            raise RuntimeError(
                f"SOFO needs the loss to be a pure function of the parameters, but the forward pass of "
                f"{type(self.module).__name__} wrote in place into {changed or 'a parameter or buffer'}. "
                "Compute new tensors instead of updating parameters or buffers in place (no .add_(), "
                ".data[...] = ..., or running statistics) inside forward/step."
            ) from exc
        return False
