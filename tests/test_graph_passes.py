"""The common-subexpression pass of the compiled windows (lightning_sofo.graph_passes): a graph
computes the same values after it, with each repeated pure expression once and every random draw
kept. The oracle is the graph before the pass, run on the same inputs and random state."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.func import jvp, vmap

from lightning_sofo import compat
from lightning_sofo.graph_passes import merge_common_subexpressions
from lightning_sofo.models import VanillaRNN


def calls(graph, name):
    return sum(1 for node in graph.nodes if node.op == "call_function" and name in str(node.target))


def run(module, *inputs, seed=0):
    torch.manual_seed(seed)
    return module(*inputs)


def test_repeats_are_merged_and_the_values_kept():
    def repeated(x, y):
        a, b = torch.tanh(x) * y, torch.tanh(x) * y  # the same expression twice
        c = torch.tanh(x) * 2.0
        return a + b + c, torch.tanh(y)

    x, y = torch.randn(4, 3), torch.randn(4, 3)
    module = make_fx(repeated)(x, y)
    before = run(module, x, y)
    assert calls(module.graph, "tanh") == 4
    merged = merge_common_subexpressions(module.graph)
    module.recompile()
    assert merged == 3  # two tanh(x) and one tanh(x) * y
    assert calls(module.graph, "tanh") == 2 and calls(module.graph, "mul") == 2
    for a, b in zip(before, run(module, x, y)):
        assert torch.equal(a, b)


def test_random_draws_and_unlike_constants_are_kept_apart():
    def noisy(x):
        first, second = torch.randn_like(x), torch.randn_like(x)  # two draws, not one
        return first, second, torch.exp(x) + torch.exp(x), x * 0.0, x * -0.0

    x = torch.randn(5)
    module = make_fx(noisy)(x)
    before = run(module, x, seed=3)
    assert merge_common_subexpressions(module.graph) == 1  # exp(x) only
    module.recompile()
    after = run(module, x, seed=3)
    assert calls(module.graph, "randn") == 2 and calls(module.graph, "mul") == 2
    assert not torch.equal(after[0], after[1]), "two noise draws"
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert torch.equal(torch.signbit(after[4]), torch.signbit(x * -0.0)), "0.0 and -0.0 are not one constant"


def test_a_graph_that_mutates_a_value_it_computed_is_left_alone():
    def in_place(x):
        bumped, again = x.clone(), x.clone()  # equal, but each is then changed on its own
        bumped.add_(1.0)
        again.mul_(2.0)
        return bumped, again, torch.exp(x) + torch.exp(x)

    x = torch.randn(5)
    module = make_fx(in_place)(x)
    before = module(x)
    assert merge_common_subexpressions(module.graph) == 0
    module.recompile()
    for a, b in zip(before, module(x)):
        assert torch.equal(a, b)


class Stepper(torch.nn.Module):
    """A model's `step` as a module's forward, for functional_call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, state, inputs):
        return self.model.step(state, inputs)


def test_forward_mode_over_tangents_of_an_rnn_step_repeats_expressions_that_the_pass_merges():
    """phi(h) enters the readout and the next step's recurrence: under vmap(jvp) its tangent
    phi'(h) h_dot is computed for every tangent twice, and the pass leaves it once."""
    torch.manual_seed(0)
    stepper = Stepper(VanillaRNN(2, 8, 2))
    params = {name: p.detach() for name, p in stepper.named_parameters()}
    tangents = {name: torch.randn(6, *p.shape) for name, p in params.items()}
    h, u = torch.randn(4, 8), torch.randn(4, 2)

    def two_steps(params):
        state, outputs = h, []
        for _ in range(2):
            state, y = torch.func.functional_call(stepper, params, (state, u))
            outputs.append(y)
        return torch.stack(outputs)

    def sketch(params, tangents):
        return vmap(lambda t: jvp(two_steps, (params,), (t,)))(tangents)

    module = make_fx(sketch)(params, tangents)
    before = module(params, tangents)
    tanh_before = calls(module.graph, "tanh")
    merged = merge_common_subexpressions(module.graph)
    module.recompile()
    after = module(params, tangents)
    assert merged > 0 and calls(module.graph, "tanh") < tanh_before, (merged, tanh_before)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_the_compiled_windows_run_the_pass():
    options = compat.compile_options("default")
    assert options["post_grad_custom_pre_pass"] is compat.common_subexpressions_pass()
    assert compat.common_subexpressions_pass().uuid()  # keys inductor's cache on disk


def test_a_compiled_window_of_forward_mode_is_kept_in_torchs_cache_on_disk():
    """A compiled window's graph calls torch.func's forward-mode bookkeeping; AOTAutograd's on-disk
    cache refuses graphs that call functions it does not know, and then every new process traced the
    window again. With compat's options the window is cached (missed, then saved), never bypassed."""
    from torch._dynamo.utils import counters

    from lightning_sofo import SOFO, SOFOEngine
    from lightning_sofo.tangents import sample_tangents, step_generator
    from lightning_sofo.timeloop import clear_compiled

    torch.manual_seed(0)
    model = VanillaRNN(3, 5, 2)
    batch = (torch.randn(3, 6, 3), torch.randn(3, 6, 2), torch.ones(3, 6, 1))
    optimizer = SOFO(model.parameters(), tangents=3)
    tangents = sample_tangents(optimizer.named_params(), 3, step_generator(0, 0, torch.device("cpu")))
    clear_compiled()
    torch._dynamo.reset()
    counters.clear()
    SOFOEngine(compile_steps=3, tangent_chunk=0).sketch_function(model, batch, optimizer)(tangents)
    aot = counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0, "AOTAutograd's cache refused the forward-mode window"
    assert aot["autograd_cache_hit"] + aot["autograd_cache_saved"] >= 1
