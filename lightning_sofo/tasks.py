"""TaskDataModule: the Lightning glue every task in datamodules/ builds on.

A task declares its trials, `generate(n_trials, generator) -> batch`, and
nothing else; this base class turns that into a stream of fresh training
trials (one seeded generator per batch, so the stream is reproducible and can
resume where a checkpoint left it), fixed validation and test sets (their own
seeds), task metrics (torchmetrics) and a figure of a few trials.

Batches are dicts {inputs (B, T, I), targets (B, T, O) or class indices
(B, T), mask broadcastable to the targets, ...task extras}.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric, MetricCollection
from torchmetrics.wrappers.abstract import WrapperMetric

from lightning_sofo.arguments import PositiveInt, require
from lightning_sofo.seeds import mixed_seed

Batch = dict[str, Tensor]

_STREAMS = {"train": 0, "val": 1, "test": 2}


def stream_seed(seed: int, stream: str, index: int, shard: int = 0) -> int:
    """A 63-bit seed for batch `index` of a stream ("train", "val", "test") of a task seeded `seed`;
    `shard` is the process rank under data parallelism (0 on one process)."""
    return mixed_seed(seed, _STREAMS[stream], index, shard)


class TaskDataModule(L.LightningDataModule):
    """Base class of the task DataModules.

    Args:
        batch_size: trials per batch B.
        batches_per_epoch: training batches between two validations.
        val_trials: the size of the fixed validation set.
        test_trials: the size of the fixed test set.
        seed: the task's seed; the training stream, validation set and test set
            derive their own seeds from it.

    Subclasses set `input_size`, `output_size` and `loss` ("mse" or
    "cross_entropy"), `dt` (seconds per step) if their trials have a physical time step,
    and implement `generate`; they may override `metrics`
    and `plot_trial`.
    """

    input_size: int
    output_size: int
    loss: str = "mse"
    dt: float | None = None  # seconds per time step; None for tasks defined in steps

    def __init__(self, batch_size: PositiveInt = 64, batches_per_epoch: PositiveInt = 100, val_trials: PositiveInt = 256,
                 test_trials: PositiveInt = 256, seed: int = 0):
        super().__init__()
        self.require_arguments(PositiveInt, batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                               val_trials=val_trials, test_trials=test_trials)
        self.require_arguments(int, seed=seed)
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.val_trials, self.test_trials, self.seed = val_trials, test_trials, seed
        self.batches_consumed = 0
        self._fixed: dict[str, list[Batch]] = {}

    # ---- what a task declares --------------------------------------------------------
    def generate(self, n_trials: int, generator: torch.Generator) -> Batch:
        """n_trials fresh trials drawn with `generator` (CPU): a batch dict."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """The task's metrics; each is updated with (outputs, batch). None by default."""
        return MetricCollection({})

    def plot_trial(self, batch: Batch, outputs: Tensor, rates: Tensor | None = None, index: int = 0):
        """A matplotlib Figure of trial `index`: inputs, targets against outputs, a few unit rates."""
        from lightning_sofo.plots import plot_sequences

        return plot_sequences(batch, outputs, rates, index, title=type(self).__name__, dt=self.dt)

    # ---- Lightning ------------------------------------------------------------------
    def draw(self, stream: str, index: int, n_trials: int | None = None, shard: int = 0) -> Batch:
        """Batch `index` of `stream` (of process `shard` under data parallelism), the same every
        time it is asked for."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, stream, index, shard))
        return self.generate(n_trials or self.batch_size, generator)

    def set_difficulty(self, **settings: Any) -> None:
        """Change constructor settings of this task in place (a curriculum step, e.g. n_steps=500):
        the task is built again with them (so the constructor's checks apply, with a clear error and
        nothing changed if they fail), the training stream goes on from where it is, and the fixed
        validation and test sets are drawn again at the new settings."""
        parameters = {name for cls in type(self).__mro__ if issubclass(cls, TaskDataModule)
                      for name, p in inspect.signature(cls.__init__).parameters.items()
                      if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        unknown = sorted(set(settings) - parameters)
        self.require(not unknown, f"set_difficulty: {unknown} are not settings of {type(self).__name__}; "
                                  f"it has {sorted(parameters)}.")
        current = {name: getattr(self, name) for name in parameters if hasattr(self, name)}
        current = {name: value.tolist() if isinstance(value, Tensor) else value for name, value in current.items()}
        rebuilt = type(self)(**{**current, **settings})  # raises, naming the problem, if they do not fit
        kept = {"trainer", "batches_consumed", "_fixed"}  # where the run is, and who runs it
        self.__dict__.update({key: value for key, value in rebuilt.__dict__.items() if key not in kept})
        self._fixed.clear()

    def fixed_set(self, stream: str) -> list[Batch]:
        """The validation or test set: batches of at most batch_size trials, drawn once."""
        if stream not in self._fixed:
            total = self.val_trials if stream == "val" else self.test_trials
            sizes = [min(self.batch_size, total - start) for start in range(0, total, self.batch_size)]
            self._fixed[stream] = [self.draw(stream, i, n) for i, n in enumerate(sizes)]
        return self._fixed[stream]

    def train_dataloader(self) -> Iterable[Batch]:
        # a sized iterable, not a DataLoader: the stream has an epoch length and draws its trials
        # in this process, seeded per batch and rank (Lightning takes any iterable as a loader)
        return _TrialStream(self)

    # the loaders read the fixed sets when they iterate, not when they are built: Lightning builds
    # them once per fit, and a curriculum step (set_difficulty) draws the sets again
    def val_dataloader(self) -> DataLoader:
        return DataLoader(_FixedSet(self, "val"), batch_size=None)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_FixedSet(self, "test"), batch_size=None)

    def predict_dataloader(self) -> DataLoader:
        # the test set's batches, through a batch sampler of one pre-drawn batch each, so that
        # Lightning can tell a prediction writer which batch of the set each prediction is
        return DataLoader(_FixedSet(self, "test"), batch_size=1, collate_fn=_the_only_item)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the stream numbers its batches; count those the training loop has actually taken
        # (the loader fetches one ahead), so a checkpoint resumes the stream where it was
        if isinstance(batch, dict) and "stream_index" in batch:
            index = int(batch.pop("stream_index"))
            if self.trainer is not None and self.trainer.training:
                self.batches_consumed = index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "batches_consumed": self.batches_consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training stream where the checkpoint left it. The seed is the task's own
        (its config's): a resume whose config changes the seed continues with the new seed, from
        the same batch count, and says so, as the optimizer's changed settings are said."""
        saved = state_dict["seed"]
        self.batches_consumed = state_dict["batches_consumed"]
        if saved != self.seed:
            rank_zero_info(f"{type(self).__name__}: the config's seed {self.seed} replaces the checkpoint's {saved}; "
                           f"the trials from batch {self.batches_consumed} on, and the validation and test sets, "
                           f"are those of seed {self.seed}.")

    # ---- checks shared by tasks ----------------------------------------------------------
    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"{type(self).__name__}: {message}")

    def require_arguments(self, kind: type, **values: Any) -> None:
        """Each value of the argument type `kind` (lightning_sofo.arguments), else a ValueError naming it."""
        require(type(self).__name__, kind, **values)


def _the_only_item(items: list[Batch]) -> Batch:
    return items[0]


class _FixedSet(Dataset):
    """The task's validation or test batches as they are now (task.fixed_set(stream)), batch i
    at index i."""

    def __init__(self, task: TaskDataModule, stream: str):
        self.task, self.stream = task, stream

    def __len__(self) -> int:
        return len(self.task.fixed_set(self.stream))

    def __getitem__(self, index: int) -> Batch:
        return self.task.fixed_set(self.stream)[index]


class _TrialStream:
    """Training batches batches_per_epoch at a time, batch i drawn from its own seed."""

    def __init__(self, task: TaskDataModule):
        self.task = task

    def __len__(self) -> int:
        return self.task.batches_per_epoch

    def __iter__(self):
        task = self.task
        epoch_end = (task.batches_consumed // task.batches_per_epoch + 1) * task.batches_per_epoch
        # under data parallelism every process draws its own trials: seeded by (seed, index, rank)
        rank = task.trainer.global_rank if task.trainer is not None else 0
        for index in range(task.batches_consumed, epoch_end):
            batch = task.draw("train", index, shard=rank)
            batch["stream_index"] = torch.tensor(index)
            yield batch


class Scored(WrapperMetric):
    """A torchmetrics metric updated from (outputs, batch): `pick(outputs, batch)` returns
    the (preds, target) it scores, e.g. the masked entries or the last time step."""

    def __init__(self, metric: Metric, pick: Callable[[Tensor, Batch], tuple[Tensor, ...]]):
        super().__init__()
        self.metric = metric
        self.pick = pick

    def update(self, outputs: Tensor, batch: Batch) -> None:
        picked = self.pick(outputs, batch)
        if picked[0].numel():  # a batch with nothing to score (no bit held yet, say) adds nothing
            self.metric.update(*picked)

    def compute(self) -> Tensor:
        return self.metric.compute()

    def reset(self) -> None:
        self.metric.reset()
        super().reset()
