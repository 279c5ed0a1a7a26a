"""SOFOModule: a LightningModule that trains by SOFO or by backpropagation."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch import Tensor


from lightning_sofo import checkpoints
from lightning_sofo.arguments import NonNegativeFloat, require
from lightning_sofo.batches import (
    check_batch,
    check_finite,
    check_mask,
    check_sequence,
    given_initial_state,
    nothing_scored_error,
    unpack_batch,
)
from lightning_sofo.compat import attached_trainer, tree_leaves
from lightning_sofo.curvature import BatchLoss, batch_loss
from lightning_sofo.hessian_free import HessianFree
from lightning_sofo.losses import LossSpec, resolve_loss
from lightning_sofo.sketch_optimizer import SketchOptimizer
from lightning_sofo.seeds import mixed_seed
from lightning_sofo.resume import ConfigWinsOnResume
from lightning_sofo.regularisers import ParameterPenalty, PenalisedLoss, Penalty, RatePenalty, WeightL1, WeightL2


class SOFOModule(L.LightningModule):
    """Base class of models trained by SOFO (strategy "sofo") or by any torch optimizer.

    Feed-forward models implement `forward(inputs) -> outputs`.
    Recurrent models implement `initial_state(batch_size) -> state` and
    `step(state, inputs_t) -> (new_state, outputs_t)`; the default `forward`
    unrolls them over dim 1: inputs (B, T, I) -> outputs (B, T, O).

    Args:
        loss: "mse" (masked mean squared error), "cross_entropy" (class-index
            targets, logits as outputs) or callable(outputs, targets, mask) -> scalar.
        weight_l2: lambda of an L2 penalty lambda * sum ||theta||^2 on the trained parameters
            (regularisers.WeightL2; under SOFO g~ += 2 lambda V^T theta, G~ += 2 lambda V^T V).
        weight_l1: lambda of a smooth L1 penalty lambda * sum (sqrt(theta^2 + eps^2) - eps) on
            the trained parameters, eps = 1e-3 (regularisers.WeightL1).
        rate_l2: lambda of a firing-rate penalty lambda * mean of r^2 over trials, steps and
            units, r = hidden_rates(state) after each step (regularisers.RatePenalty; a
            recurrent model that defines hidden_rates).
        penalties: further penalties, regularisers.RatePenalty(strength, fn) on the rates of
            each step or regularisers.ParameterPenalty(strength, fn) on the parameters, e.g.
            a user function given by import path in a config.

    Every penalty is part of the training objective under backpropagation and under SOFO,
    where its gradient and exact curvature enter the sketches (lightning_sofo.regularisers);
    validation and test losses are the task's alone.

    Batches are dicts {"inputs", "targets"[, "mask"]} or tuples in that order,
    with the mask broadcastable to the targets. A recurrent model may define
    `hidden_rates(state) -> (B, N)`, the firing rates of a state, for rate penalties,
    plots and analysis.
    """

    def __init__(self, loss: LossSpec = "mse", weight_l2: NonNegativeFloat = 0.0, weight_l1: NonNegativeFloat = 0.0,
                 rate_l2: NonNegativeFloat = 0.0, penalties: list[Penalty] | None = None):
        super().__init__()
        self.loss_fn = resolve_loss(loss)
        require(type(self).__name__, NonNegativeFloat, weight_l2=weight_l2, weight_l1=weight_l1, rate_l2=rate_l2)
        self.weight_l2 = float(weight_l2)
        self.penalties = self._penalties(float(weight_l2), float(weight_l1), float(rate_l2), penalties)
        # (state, t) -> state, applied before step t of `unroll` (evaluation and plots; SOFO's
        # engine does not use it): set by callbacks.Perturbation for the validations it perturbs
        self.state_perturbation: Callable[[Any, int], Any] | None = None
        self.resume_policy = ConfigWinsOnResume()  # on a resumed fit the config's settings win
        self._noise_seed: int | None = None  # drawn on first use (noise_seed)

    def _penalties(self, weight_l2: float, weight_l1: float, rate_l2: float,
                   penalties: list[Penalty] | None) -> list[Penalty]:
        given = list(penalties or [])
        wrong = [p for p in given if not isinstance(p, (RatePenalty, ParameterPenalty))]
        if wrong:
            raise TypeError(
                f"penalties take lightning_sofo.regularisers.RatePenalty or ParameterPenalty objects, got {wrong!r}; "
                "e.g. penalties=[RatePenalty(1e-3, fn=my_rate_penalty)]."
            )
        built = [WeightL2(weight_l2)] if weight_l2 else []
        built += [WeightL1(weight_l1)] if weight_l1 else []
        built += [RatePenalty(rate_l2)] if rate_l2 else []
        built += given
        if any(isinstance(p, RatePenalty) for p in built) and not (self.is_recurrent and hasattr(self, "hidden_rates")):
            raise ValueError(
                f"a firing-rate penalty (rate_l2 or a RatePenalty) needs a recurrent model whose rates are known, "
                f"but {type(self).__name__} does not define "
                f"{'hidden_rates(state)' if self.is_recurrent else 'initial_state and step'}; define "
                "hidden_rates(state) -> (B, N) (the firing rates of a state), or drop the rate penalty."
            )
        return built

    @property
    def rate_penalties(self) -> list[RatePenalty]:
        return [p for p in self.penalties if isinstance(p, RatePenalty)]

    @property
    def parameter_penalties(self) -> list[ParameterPenalty]:
        return [p for p in self.penalties if isinstance(p, ParameterPenalty)]

    # ---- the recurrent contract ------------------------------------------------
    def initial_state(self, batch_size: int) -> Any:
        """The state h_0 of a batch of `batch_size` trials: a tensor (B, N) or a tuple of tensors."""
        raise NotImplementedError

    def step(self, state: Any, inputs_t: Tensor) -> tuple[Any, Tensor]:
        """One time step: (state, inputs_t (B, I)) -> (new_state, outputs_t (B, O))."""
        raise NotImplementedError

    def step_with_rates(self, state: Any, inputs_t: Tensor) -> tuple[Any, tuple[Tensor, Tensor]]:
        """`step`, with the rates of the new state beside the outputs: (state, inputs_t) ->
        (new_state, (outputs_t (B, O), hidden_rates(new_state) (B, N))); the step SOFO runs
        when rates are penalised (rate_l2, RatePenalty)."""
        state, outputs = self.step(state, inputs_t)
        return state, (outputs, self.hidden_rates(state))

    @property
    def in_a_trainer(self) -> bool:
        """Whether a Trainer runs this module (a SOFOModule also runs in a plain torch loop)."""
        return attached_trainer(self) is not None

    @property
    def is_recurrent(self) -> bool:
        return type(self).step is not SOFOModule.step

    def forward(self, inputs: Tensor, initial_state: Any = None) -> Tensor:
        """Outputs (B, T, O) of a recurrent model over inputs (B, T, I), from `initial_state` (the
        trials' own h_0) or, when None, from the model's initial_state(B)."""
        if not self.is_recurrent:
            raise NotImplementedError(
                f"{type(self).__name__} implements neither forward(inputs) (feed-forward) nor "
                "initial_state(batch_size) and step(state, inputs_t) (recurrent); implement one of the two."
            )
        return self.unroll(inputs, initial_state=initial_state)

    def unroll(self, inputs: Tensor, return_states: bool = False,
               initial_state: Any = None) -> Tensor | tuple[Tensor, list[Any]]:
        """Run `step` over inputs (B, T, I) from `initial_state` (default: the model's
        initial_state(B)); returns outputs (B, T, O), and with return_states also the list of the
        T states after each step. `state_perturbation`, when set, changes the state before each step."""
        check_sequence(type(self).__name__, inputs, getattr(self, "input_size", None))
        state = self.initial_state(inputs.shape[0]) if initial_state is None else initial_state
        outputs, states = [], []
        for t in range(inputs.shape[1]):
            if self.state_perturbation is not None:
                state = self.state_perturbation(state, t)
            state, y = self.step(state, inputs[:, t])
            outputs.append(y)
            if return_states:
                states.append(state)
        outputs = torch.stack(outputs, dim=1)
        return (outputs, states) if return_states else outputs

    def unroll_with_rates(self, inputs: Tensor, initial_state: Any = None) -> tuple[Tensor, Tensor]:
        """`unroll` over inputs (B, T, I), with the rates after each step: outputs (B, T, O) and
        hidden_rates of the T states (B, T, N). Needs a model that defines hidden_rates."""
        outputs, states = self.unroll(inputs, return_states=True, initial_state=initial_state)
        return outputs, torch.stack([self.hidden_rates(state) for state in states], dim=1)

    def check_batch(self, inputs: Tensor, targets: Tensor, mask: Tensor | None) -> None:
        """Types, dtypes, devices and batch sizes of a batch against this model (metadata only,
        no device sync); raises a ValueError that says what was expected (lightning_sofo.batches)."""
        check_batch(type(self).__name__, next(self.parameters(), None), inputs, targets, mask)

    # ---- backpropagation route (any torch optimizer, default strategy) ---------------
    def compute_loss(self, batch: Any) -> Tensor:
        return self._outputs_and_loss(batch)[1]

    def validated_batch(self, batch: Any, require_scored: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
        """(inputs, targets, mask) of a batch that fits this model, holds only finite values and targets
        the loss can score, and (require_scored) scores something. A data-parallel strategy passes
        require_scored=False for one rank's shard and checks the global batch's count instead."""
        inputs, targets, mask = unpack_batch(batch)
        self.check_batch(inputs, targets, mask)
        check_finite(inputs=inputs, targets=targets, mask=mask)
        check_mask(mask)
        self.loss_fn.check_targets(targets, getattr(self, "output_size", None))
        if require_scored and targets.numel() and self.loss_fn.scores_nothing(targets, mask):
            raise nothing_scored_error()  # (an empty batch, or T = 0, gets its own error from the model)
        return inputs, targets, mask

    def outputs_of(self, batch: Any) -> Tensor:
        """The model's outputs on a batch's inputs, from the trials' own h_0 when the batch gives one."""
        inputs, _, _ = unpack_batch(batch)
        start = self.checked_initial_state(batch)
        return self(inputs) if start is None else self(inputs, initial_state=start)

    def checked_initial_state(self, batch: Any) -> Any | None:
        """batch["initial_state"], checked against this model (recurrent, one state per trial), or None."""
        start = given_initial_state(batch)
        if start is None:
            return None
        if not self.is_recurrent:
            raise ValueError(f"the batch gives an initial_state, but {type(self).__name__} is feed-forward (it has no "
                             "state); drop the batch's 'initial_state'.")
        inputs, _, _ = unpack_batch(batch)
        for leaf in tree_leaves(start):
            if not isinstance(leaf, Tensor) or leaf.shape[:1] != inputs.shape[:1]:
                raise ValueError(f"the batch's initial_state must hold one state per trial (leading dimension B = "
                                 f"{inputs.shape[0]}, as the inputs); got {getattr(leaf, 'shape', type(leaf).__name__)}.")
        return start

    def _outputs_and_loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        inputs, targets, mask = self.validated_batch(batch)
        outputs = self.outputs_of(batch)
        return outputs, self.loss_fn(outputs, targets, mask)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        attached = self.in_a_trainer
        micro_batch = batch_idx % self.trainer.accumulate_grad_batches if attached else 0  # accumulated batches differ
        step, stream = self.trainer.global_step if attached else 0, f"train/{micro_batch}"
        for optimizer in self.trainer.optimizers if attached else []:
            if isinstance(optimizer, HessianFree):  # its Gauss-Newton products need this batch's loss function
                optimizer.check_run(self.trainer.accumulate_grad_batches, self.trainer.world_size)
                optimizer.bind(self.gauss_newton_problem(batch, step, stream))
        with self.noise_draws(step, stream=stream):
            loss = self.training_objective(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def gauss_newton_problem(self, batch: Any, step: int = 0, stream: str = "train/0") -> BatchLoss:
        """This batch's training loss as pure functions of the trainable parameters
        (curvature.BatchLoss: loss, outputs, output_loss), for a full-space Gauss-Newton optimizer
        (HessianFree). Every call draws the model's noise of training step `step` (noise_draws), the
        same draw as the training step's own loss, so the functions are deterministic."""
        if self.penalties:
            raise ValueError(
                f"{type(self).__name__} has penalties ({', '.join(type(p).__name__ for p in self.penalties)}); "
                "HessianFree minimises the task's loss alone: train with SOFO or Adam, or drop the penalties.")
        problem = batch_loss(self, batch)

        def drawn(function: Callable) -> Callable:
            def call(*args):
                with self.noise_draws(step, stream=stream):
                    return function(*args)
            return call

        return BatchLoss(problem.params, drawn(problem.loss), drawn(problem.outputs), problem.output_loss)

    def hessian_free_closure(self, batch: Any, optimizer: HessianFree, step: int = 0,
                             stream: str = "train/0") -> Callable[[], Tensor]:
        """Bind `batch` to the HessianFree `optimizer` (gauss_newton_problem) and return the closure its
        step takes, outside a Trainer: zero the gradients, backpropagate the loss, return it.
        Usage: `loss = optimizer.step(model.hessian_free_closure(batch, optimizer))`."""
        optimizer.bind(self.gauss_newton_problem(batch, step, stream))

        def closure() -> Tensor:
            optimizer.zero_grad()
            with self.noise_draws(step, stream=stream):
                loss = self.compute_loss(batch)
            loss.backward()
            return loss

        return closure

    def training_objective(self, batch: Any) -> Tensor:
        """The task's loss plus every penalty: what training minimises, by backpropagation here
        and by SOFO in its sketches (engine.SOFOEngine.sketch_function)."""
        if self.rate_penalties:
            inputs, targets, mask = self.validated_batch(batch)
            outputs, rates = self.unroll_with_rates(inputs, initial_state=self.checked_initial_state(batch))
            loss = PenalisedLoss(self.loss_fn, self.rate_penalties)((outputs, rates), targets, mask)
        else:
            loss = self.compute_loss(batch)
        if self.parameter_penalties:
            trained = {name: p for name, p in self.named_parameters() if p.requires_grad}
            loss = loss + sum(penalty(trained) for penalty in self.parameter_penalties)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", batch_idx)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        step = self.trainer.global_step if self.in_a_trainer else 0
        with self.noise_draws(step, stream=f"predict/{batch_idx}"):
            return self.outputs_of(batch)

    def _evaluate(self, batch: Any, stage: str, batch_idx: int = 0) -> Tensor:
        """Loss, and the task's metrics (from the DataModule, see setup), of one batch."""
        step = self.trainer.global_step if self.in_a_trainer else 0
        with self.noise_draws(step, stream=f"{stage}/{batch_idx}"):
            outputs, loss = self._outputs_and_loss(batch)
        # sync_dist: under sofo_ddp each rank scores its share of the validation set
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val", sync_dist=True)
        metrics = getattr(self, f"{stage}_metrics", None)
        if metrics is not None and len(metrics) and isinstance(batch, dict):
            metrics.update(outputs, batch)
            self.log_dict(metrics, prog_bar=stage == "val")
        return loss

    def setup(self, stage: str) -> None:
        """Check the model against the task (input and output sizes, loss) and take the
        task's metrics, when the Trainer runs with a DataModule that declares them."""
        task = getattr(self.trainer, "datamodule", None) if self.in_a_trainer else None
        if task is None:
            return
        for size in ("input_size", "output_size"):
            ours, theirs = getattr(self, size, None), getattr(task, size, None)
            if isinstance(ours, int) and isinstance(theirs, int) and ours != theirs:
                raise ValueError(
                    f"{type(task).__name__} has {size}={theirs} but {type(self).__name__} was built with "
                    f"{size}={ours}; build the model with {size}={theirs} (in a config: model.init_args.{size})."
                )
        task_loss = getattr(task, "loss", None)
        if isinstance(task_loss, str) and type(resolve_loss(task_loss)) is not type(self.loss_fn):
            raise ValueError(
                f"{type(task).__name__} is scored with loss {task_loss!r} but {type(self).__name__} uses "
                f"{type(self.loss_fn).__name__}; build the model with loss={task_loss!r}."
            )
        if hasattr(task, "metrics"):
            metrics = task.metrics()
            self.val_metrics = metrics.clone(prefix="val/")
            self.test_metrics = metrics.clone(prefix="test/")

    def on_before_optimizer_step(self, optimizer) -> None:
        """Backpropagation route: a step whose gradients are not finite is skipped (the gradients
        are dropped, so the optimizer leaves every parameter and its own state as they were)."""
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if not gradients or bool(torch.stack([torch.isfinite(g).all() for g in gradients]).all()):
            return
        for p in self.parameters():
            p.grad = None
        self.nonfinite_gradient_steps = getattr(self, "nonfinite_gradient_steps", 0) + 1
        warnings.warn(
            f"step {self.trainer.global_step}: the loss or its gradients are not finite; the optimizer step was "
            f"skipped and the parameters left as they were ({self.nonfinite_gradient_steps} such steps so far). "
            "Usual causes: exploding dynamics over the trial (lower the initial gain or the lr, clip gradients) "
            "or extreme values in the data.",
            stacklevel=2,
        )
        self.log("nonfinite_gradient_steps", float(self.nonfinite_gradient_steps))

    def on_fit_start(self) -> None:
        uses_sofo = any(isinstance(opt, SketchOptimizer) for opt in self.trainer.optimizers)
        if uses_sofo and not getattr(self.trainer.strategy, "runs_sofo", False):
            raise RuntimeError(
                "configure_optimizers returned a SOFO or FGD optimizer, but the Trainer's strategy "
                f"({type(self.trainer.strategy).__name__}) trains by backpropagation. "
                "Use Trainer(strategy='sofo'), or return a torch optimizer such as Adam to train by BPTT."
            )
        self.resume_policy.fit_started(self.trainer)
        self.noise_seed = self.trainer.strategy.broadcast(self.noise_seed, src=0)  # one noise seed for all ranks

    def on_train_start(self) -> None:
        """On a resumed run, the config's settings win over the checkpoint's (lightning_sofo.resume)."""
        self.resume_policy.train_started(self.trainer)

    # ---- checkpoints and noise ---------------------------------------------------------
    @property
    def noise_seed(self) -> int:
        """Seed of the model's random draws (its noise): drawn once from torch's global generator
        (so seed_everything fixes it), then saved in every checkpoint."""
        if self._noise_seed is None:
            self._noise_seed = int(torch.randint(0, 2**62, (1,)))
        return self._noise_seed

    @noise_seed.setter
    def noise_seed(self, value: int) -> None:
        self._noise_seed = int(value)

    @contextlib.contextmanager
    def noise_draws(self, step: int, stream: str = "train") -> Iterator[None]:
        """Inside, torch's random draws (the model's noise) are a pure function of (noise_seed,
        step, process rank, stream): a resumed run draws exactly the noise an uninterrupted one
        would, and under sofo_ddp each rank draws its own. torch's global generator is
        restored on exit, so the rest of the program's random stream is not touched."""
        rank = self.global_rank if self.in_a_trainer else 0
        seed = mixed_seed(self.noise_seed, step, rank, stream)
        device = self.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Lightning's load_from_checkpoint, which also reads checkpoints written while the SOFO
        engine's settings (compile_steps, ...) were model hyperparameters (they are dropped)."""
        return super().load_from_checkpoint(checkpoints.without_engine_settings(checkpoint_path), *args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        optimizers = self.trainer.optimizers if self.in_a_trainer else []
        checkpoint[checkpoints.METADATA_KEY] = {
            **checkpoints.metadata(self, optimizers), "noise_seed": self.noise_seed,
            "configured_groups": self.resume_policy.configured_groups,  # the config this run was given
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metadata = checkpoint.get(checkpoints.METADATA_KEY, {})
        if metadata.get("noise_seed") is not None:
            self.noise_seed = metadata["noise_seed"]
        if not self.in_a_trainer:  # load_from_checkpoint: Lightning's own (strict or not) load decides
            return
        if self.strict_loading:
            checkpoints.check_matches(self, checkpoint, self.trainer.ckpt_path)
        if self.trainer.state.fn == "fit":  # resuming: what on_fit_start / on_train_start compare against
            self.resume_policy.checkpoint_loaded(checkpoint)
