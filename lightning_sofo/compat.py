"""The one place lightning_sofo touches private Lightning and torch names.

Checked against the Lightning range pinned in pyproject.toml (2.6.x); tests/test_cli.py fails,
naming the method, if a Lightning release removes or renames it.

- `LightningCLI._parse_ckpt_path` (Lightning 2.3+): with an explicit `--ckpt_path`, LightningCLI
  replaces the model's config with the hyperparameters saved in that checkpoint, silently
  overriding the command line and the config file (and hiding a size mismatch). Lightning has no
  public switch for this; `ConfigWinsOverCheckpoint` turns it off, and the `sofo` command then
  checks the checkpoint against the run's own config instead (lightning_sofo.cli).

- `LightningModule._trainer`: whether a module is attached to a Trainer. The public `trainer`
  property raises when it is not, and a SOFOModule also runs outside a Trainer (a plain torch loop,
  the benchmarks), so `attached_trainer` reads the attribute.
- `SingleDeviceStrategy._root_device`: the device given to `SOFOStrategy(device=...)` explicitly,
  which its `root_device` property must return instead of the Trainer's choice (`explicit_device`).

- `torch.utils._pytree.tree_leaves` and `tree_map`: the leaves of a recurrent state (a tensor or
  tuples / lists / dicts of them), and a function applied to each. torch has no public pytree API
  in the pinned release (torch.func handles pytrees internally with these); they are imported here
  and used from here (`tree_leaves`, `tree_map`).

- `torch._inductor.list_mode_options`: the inductor options a torch.compile mode stands for.
  torch.compile takes a mode or an options dict, not both, and the engine needs one option beside
  the mode (`compile_options`): `fallback_random`, so that a compiled window draws its random
  numbers (a noisy network's noise) with the same torch generator calls as the eager time loop.
  Otherwise inductor draws them by its own generator: the compiled and eager engines then see
  different noise, and a step whose windows run partly eagerly (torch falls back to eager code
  silently when a compiled function reaches its recompilation limit) would mix two noise draws
  among its tangent chunks.

- `torch._inductor.custom_graph_pass.CustomGraphPass` and inductor's `post_grad_custom_pre_pass`
  option: the hook that runs a pass on each graph inductor compiles, keyed into inductor's cache by
  the pass's `uuid`. The engine's compiled windows run `graph_passes.merge_common_subexpressions`
  there (`common_subexpressions_pass`), which inductor does not do for inference graphs: forward mode
  computes each repeated expression of a step over all K tangents; merging them brought the
  default engine from 1.45-1.6x to 1.4x the matmul floor alone, and from 1.6-1.7x to 1.2x beside
  busy jobs (benchmarks/RESULTS.md, "Engine speed"). The pass reads an operator's `_schema` (which
  arguments it writes; `operator_schema`), for which torch has no public accessor.

- The names of four of torch.func's forward-mode bookkeeping functions
  (`torch._functorch.predispatch._jvp_increment_nesting`, `_jvp_decrement_nesting`,
  `_enter_dual_level`, `_exit_dual_level`; `FORWARD_MODE_BOOKKEEPING`), given to inductor's
  `unsafe_marked_cacheable_functions` option. A graph of `jvp` traced by torch.compile calls them,
  and AOTAutograd's on-disk cache refuses any graph that calls a function it does not know to be
  safe to cache, so every new process traced the window's forward-mode graph again: 5-9 s of a warm
  start at the flip-flop's shapes (benchmarks/RESULTS.md, "Start-up"). They only enter and leave
  forward-mode levels, so the graph that calls them is determined by its code and the torch version,
  which is what the option keys the cache by.

tests/test_cli.py checks that each still exists, and that no other module uses a private Lightning
or torch name.

One behaviour without a private name is relied on as well: Lightning's accelerator connector fills
the `parallel_devices` attribute of any strategy that has one (as it does for its own parallel
strategies), which is how `strategy="sofo"` learns the device of `accelerator=` / `devices=`
(lightning_sofo.strategy.SOFOStrategy). tests/test_training.py and tests/test_misuse.py check it.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch.utils._pytree import tree_leaves, tree_map  # noqa: F401  (the state's leaves; see above)

PRIVATE_NAMES = {LightningCLI: ("_parse_ckpt_path",)}  # what this module overrides, for the test
PRIVATE_ATTRIBUTES = {L.LightningModule: "_trainer", SingleDeviceStrategy: "_root_device"}  # read, for the test


@functools.cache
def common_subexpressions_pass() -> Any:
    """inductor's hook for `graph_passes.merge_common_subexpressions` (see the module docstring);
    one instance per process, built on first use (importing inductor takes seconds)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from lightning_sofo.graph_passes import merge_common_subexpressions  # it reads operator_schema from here

    class CommonSubexpressions(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            merge_common_subexpressions(graph)

        def uuid(self) -> str:
            return "lightning_sofo.graph_passes.merge_common_subexpressions/1"

    return CommonSubexpressions()


def operator_schema(target: Any) -> Any:
    """The schema of a graph node's operator (an OpOverload's `_schema`: its arguments and which it
    writes), or None for a target without one (a Python function)."""
    return getattr(target, "_schema", None)


# torch.func's forward-mode bookkeeping, which AOTAutograd's cache may store graphs of (see above)
FORWARD_MODE_BOOKKEEPING = tuple(f"torch._functorch.predispatch.{name}" for name in (
    "_jvp_increment_nesting", "_jvp_decrement_nesting", "_enter_dual_level", "_exit_dual_level"))


def compile_options(mode: str) -> dict:
    """torch.compile's options for `mode` ("default", "reduce-overhead", "max-autotune"), with random
    numbers drawn by torch's generator as in eager code, repeated expressions merged, and the
    forward-mode graphs kept in AOTAutograd's on-disk cache (see the module docstring)."""
    from torch._inductor import list_mode_options

    return {**list_mode_options(mode), "fallback_random": True,
            "post_grad_custom_pre_pass": common_subexpressions_pass(),
            "unsafe_marked_cacheable_functions": {name: torch.__version__ for name in FORWARD_MODE_BOOKKEEPING}}


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The Trainer `module` is attached to, or None outside one."""
    return module._trainer


def explicit_device(strategy: SingleDeviceStrategy) -> torch.device:
    """The device a single-device strategy was built with."""
    return strategy._root_device


class ConfigWinsOverCheckpoint(LightningCLI):
    """A LightningCLI whose run settings come from its config and command line only, never from
    the hyperparameters stored in the checkpoint given by `--ckpt_path`."""

    def _parse_ckpt_path(self) -> None:
        return None
