"""Common subexpressions merged in a compiled window's graph.

A recurrent model computes some expressions twice per time step: a vanilla RNN takes the rates
phi(h_{t+1}) once for its readout y_t = C phi(h_{t+1}) + d and again, in the next step, for its
recurrence W phi(h_{t+1}). Eagerly that costs little. Under forward mode over K tangents it costs
one more pass over every (K, B, N) tangent for each repeat (phi'(h) * h_dot, computed and stored
twice), and inductor keeps the repeats in the graphs it compiles for inference (it merges them in
training graphs only). `merge_common_subexpressions` merges every repeat of a pure operation on the
same inputs, so each is computed once; the engine's compiled windows run it on their graph
(compat.compile_options). A random operation is never merged: two draws of noise stay two draws.
"""

from __future__ import annotations

import re
from typing import Any, Hashable

import torch
from torch.fx import Graph, Node

from lightning_sofo.compat import operator_schema

# Operations whose repeats differ by design (random draws), by name when an operation carries no tag.
RANDOM = re.compile(r"rand|seed|bernoulli|dropout|normal|uniform|multinomial|poisson|exponential|geometric|cauchy")


class Unmergeable(Exception):
    """An argument that cannot be compared by value (a tensor constant, a symbolic size)."""


def argument_key(value: Any) -> Hashable:
    """A hashable stand-in of one argument, equal for arguments that are certainly equal: graph
    nodes by identity, Python values by type and value (floats by repr, so 0.0 and -0.0 differ)."""
    if isinstance(value, Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(argument_key(item) for item in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(key), argument_key(item)) for key, item in value.items())))
    if isinstance(value, slice):
        return ("slice", argument_key(value.start), argument_key(value.stop), argument_key(value.step))
    if isinstance(value, float):
        return ("float", repr(value))
    if value is None or isinstance(value, (bool, int, str, torch.dtype, torch.device, torch.layout,
                                           torch.memory_format)):
        return (type(value).__name__, value)
    raise Unmergeable(type(value).__name__)


def is_random(node: Node) -> bool:
    """Whether the operation draws random numbers."""
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags or bool(RANDOM.search(str(node.target)))


def mutates_a_computed_value(node: Node) -> bool:
    """Whether the operation writes into an argument that the graph computed (not one of its inputs):
    merging two equal values would then let one's mutation reach the other's users."""
    schema = operator_schema(node.target)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return False
    written = [argument.name for argument in schema.arguments
               if argument.alias_info is not None and argument.alias_info.is_write]
    named = dict(zip((argument.name for argument in schema.arguments), node.args))
    values = [named.get(name, node.kwargs.get(name)) for name in written]
    return any(isinstance(value, Node) and value.op != "placeholder" for value in values)


def merge_common_subexpressions(graph: Graph) -> int:
    """Replace, in place, each call of a pure, non-random operation that repeats an earlier call with
    the same target and arguments by that earlier call; returns how many calls were merged. The
    graph computes the same values (the merged calls were equal by construction). A graph that
    mutates a value it computed (not functional, unlike the graphs inductor compiles) is left as it
    is, and 0 returned."""
    if any(mutates_a_computed_value(node) for node in graph.nodes):
        return 0
    earlier: dict[Hashable, Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure() or is_random(node):
            continue
        try:
            key = (node.target, argument_key(node.args), argument_key(node.kwargs))
        except Unmergeable:
            continue
        if key in earlier:
            node.replace_all_uses_with(earlier[key])
            graph.erase_node(node)
            merged += 1
        else:
            earlier[key] = node
    return merged
