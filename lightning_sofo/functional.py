"""The SOFO math, plain torch (no Lightning): tangents, sketches, subspace solve.

Notation: parameters theta (P numbers in all), K tangents V = [v_1 .. v_K] in R^{P x K} with
orthonormal columns, model outputs y, output tangents Y_k = J v_k, loss L(y) with gradient
dL/dy and Hessian H_L with respect to the outputs.

    sketched gradient  g~_k  = dL/dy . Y_k          (K,)    = V^T grad L
    sketched GGN       G~_kl = Y_k^T H_L Y_l        (K, K)  = V^T J^T H_L J V
    update             theta <- theta - lr V a,   SOFO: a = (G~ + lambda I)^{-1} g~,
                       lambda = damping * max eig(G~);   FGD: a = g~ (times P/K if asked)

Parameters and tangents travel as dicts {name: tensor} (Params); a tangent dict holds
tensors of shape (K, *parameter.shape).

The math lives in one module per concept, each read top to bottom beside docs/math.md:

    lightning_sofo.tangents      V: the random directions and their generator (math sections 1, 7)
    lightning_sofo.sketch        Sketch (loss, g~, G~), batched_jvp (K tangents in one forward pass)
                                 and the sketch of a feedforward model (sections 2-3)
    lightning_sofo.timeloop      the forward-mode time loop of a recurrent model: recurrent_sketch,
                                 recurrent_loss, in (compiled) windows of steps (section 2)
    lightning_sofo.solve         the damped solve for a, FGD's a, and adaptive damping (sections 4, 5, 8)
    lightning_sofo.losses        each loss's own g~ and G~ (section 3)
    lightning_sofo.regularisers  the penalties and their sketches (section 7b)

This module re-exports their public names, so `from lightning_sofo.functional import
sample_tangents` keeps working. The engine's settings (SKETCH_BLOCK, AUTO_COMPILE_*, AUTO_CHUNK_*)
are read from lightning_sofo.timeloop: change them there, not here.
"""

from __future__ import annotations

from lightning_sofo.regularisers import (parameter_penalty_sketch, smooth_l1, smooth_l1_sketch, weight_penalty,
                                         weight_penalty_sketch)
from lightning_sofo.sketch import Params, Sketch, SketchedLoss, batched_jvp, feedforward_sketch
from lightning_sofo.solve import (LevenbergMarquardt, SubspaceStep, forward_gradient_coefficients, predicted_change,
                                  reduction_ratio, solve_subspace)
from lightning_sofo.tangents import (TANGENT_BASES, block_columns, count_tangents, cycle_columns, flatten_directions,
                                     gaussian_columns, in_block, orthonormal_columns, sample_tangents, split_tangents,
                                     step_generator, unit_norm_columns, usable_tangent_count)
from lightning_sofo.timeloop import (AUTO_CHUNK_BYTES, AUTO_CHUNK_MIN, AUTO_COMPILE_MIN_STEPS, AUTO_COMPILE_WINDOW,
                                     SKETCH_BLOCK, clear_compiled, recurrent_loss, recurrent_sketch,
                                     resolve_compile_steps, resolve_tangent_chunk, step_loop, step_through)

__all__ = [
    # sketch
    "Params",
    "Sketch",
    "SketchedLoss",
    "batched_jvp",
    "feedforward_sketch",
    # tangents
    "TANGENT_BASES",
    "block_columns",
    "count_tangents",
    "cycle_columns",
    "flatten_directions",
    "gaussian_columns",
    "in_block",
    "orthonormal_columns",
    "sample_tangents",
    "split_tangents",
    "step_generator",
    "unit_norm_columns",
    "usable_tangent_count",
    # timeloop
    "AUTO_CHUNK_BYTES",
    "AUTO_CHUNK_MIN",
    "AUTO_COMPILE_MIN_STEPS",
    "AUTO_COMPILE_WINDOW",
    "SKETCH_BLOCK",
    "clear_compiled",
    "recurrent_loss",
    "recurrent_sketch",
    "resolve_compile_steps",
    "resolve_tangent_chunk",
    "step_loop",
    "step_through",
    # solve
    "LevenbergMarquardt",
    "SubspaceStep",
    "forward_gradient_coefficients",
    "predicted_change",
    "reduction_ratio",
    "solve_subspace",
    # regularisers
    "parameter_penalty_sketch",
    "smooth_l1",
    "smooth_l1_sketch",
    "weight_penalty",
    "weight_penalty_sketch",
]
