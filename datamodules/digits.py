"""Sequential digit classification: an image is read one row per time step, top to bottom,
and the class is scored by cross-entropy at the last step only.

Two sources of images:
  - the 8x8 handwritten digits that scikit-learn ships (1,797 images, 16 grey
    levels): T = 8 rows of I = 8 pixels; needs the [digits] extra (scikit-learn);
  - MNIST (28x28) from a folder holding its standard IDX files
    (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
    t10k-labels-idx1-ubyte, each optionally .gz): T = 28 rows of I = 28 pixels.
Pixels are scaled to [0, 1]. Each row can be held for several steps (steps_per_row).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_sofo.arguments import PositiveInt
from lightning_sofo.tasks import Batch, Scored, TaskDataModule

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_SEED = 1234  # the held-out digits are the same whatever the training seed


def read_idx(path: str | Path) -> Tensor:
    """The array in an IDX file (MNIST's format; gzip-compressed if the name ends in .gz).

    Layout: two zero bytes, a type code (0x08 unsigned byte, 0x09 signed byte,
    0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions d,
    then d big-endian int32 sizes, then the data in C order, big-endian.
    """
    path = Path(path)
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes should be 0, 0, a type code, a rank).")
    dtype, rank = np.dtype(_IDX_TYPES[data[2]]), data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">i4", count=rank, offset=4))
    offset = 4 + 4 * rank
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: the header promises shape {shape} ({expected} bytes of data) "
                         f"but the file holds {len(data) - offset}; the file is truncated or corrupt.")
    array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz", folder / "MNIST" / "raw" / name,
                      folder / "MNIST" / "raw" / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {name}[.gz] in {folder} (nor in {folder / 'MNIST' / 'raw'}); a MNIST folder holds "
        f"{', '.join(f for pair in MNIST_FILES.values() for f in pair)} (optionally .gz). "
        "Set mnist_dir=None to use scikit-learn's 8x8 digits instead."
    )


def load_mnist(folder: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """Images (M, 28, 28) uint8 and labels (M,) int64 of MNIST's "train" or "test" split."""
    images_name, labels_name = MNIST_FILES[split]
    images, labels = read_idx(_find(Path(folder), images_name)), read_idx(_find(Path(folder), labels_name))
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images of shape {tuple(images.shape)} do not go with labels of shape "
                         f"{tuple(labels.shape)}; expected (M, H, W) images and (M,) labels.")
    return images, labels.long()


def load_sklearn_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 8x8 digits: images (1797, 8, 8) with values 0..16, labels (1797,)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "SequentialDigits reads scikit-learn's 8x8 digits: pip install scikit-learn "
            "(or lightning-sofo[digits]), or give mnist_dir, a folder with MNIST's IDX files."
        ) from None
    digits = load_digits()
    return torch.from_numpy(digits.images).float(), torch.from_numpy(digits.target).long()


class SequentialDigits(TaskDataModule):
    """Classify a handwritten digit read one row per step; cross-entropy at the last step.

    Args:
        mnist_dir: None for scikit-learn's 8x8 digits, or a folder with MNIST's IDX files.
        steps_per_row: steps each row is shown for, T = rows * steps_per_row.
        val_trials: images held out of training for validation (from the training images).
        test_trials: size of the test set; None: 300 held-out 8x8 digits, or all of
            MNIST's 10,000 test images.
        **kwargs: the other TaskDataModule arguments (batch_size, batches_per_epoch, seed).
            Training batches are drawn from the training images without replacement
            within a batch, one seeded generator per batch.

    Batches: inputs (B, T, I) in [0, 1], targets (B, T) the class at every step, mask
    (B, T) 1 at the last step only; "images" (B, H, W) for figures.
    """

    output_size = 10
    loss = "cross_entropy"

    def __init__(self, mnist_dir: str | None = None, steps_per_row: PositiveInt = 1, val_trials: int = 300,
                 test_trials: int | None = None, **kwargs: Any):
        super().__init__(val_trials=val_trials, test_trials=test_trials or 1, **kwargs)
        self.require_arguments(PositiveInt, steps_per_row=steps_per_row)
        self.require(test_trials is None or (isinstance(test_trials, int) and test_trials >= 1),
                     f"test_trials must be a positive integer or None (the whole test split), got {test_trials!r}.")
        self.mnist_dir, self.steps_per_row, self.test_trials = mnist_dir, steps_per_row, test_trials
        self._splits: dict[str, tuple[Tensor, Tensor]] | None = None
        width = 28 if mnist_dir is not None else 8
        self.input_size, self.n_steps = width, width * steps_per_row

    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{"train", "val", "test"}: (images (M, H, W) in [0, 1], labels (M,)), loaded once."""
        if self._splits is None:
            split_generator = torch.Generator().manual_seed(SPLIT_SEED)
            if self.mnist_dir is None:
                images, labels = load_sklearn_digits()
                images = images / 16.0
                test_size = self.test_trials or 300
                self.require(self.val_trials + test_size < len(labels),
                             f"val_trials + test_trials = {self.val_trials + test_size} leaves no training images "
                             f"of the {len(labels)} digits; lower them.")
                order = torch.randperm(len(labels), generator=split_generator)
                test, val, train = order[:test_size], order[test_size:test_size + self.val_trials], \
                    order[test_size + self.val_trials:]
                self._splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
                                "test": (images[test], labels[test])}
            else:
                images, labels = load_mnist(self.mnist_dir, "train")
                test_images, test_labels = load_mnist(self.mnist_dir, "test")
                self.require(self.val_trials < len(labels),
                             f"val_trials={self.val_trials} leaves none of the {len(labels)} training images.")
                self.require(images.shape[-1] == self.input_size,
                             f"the MNIST images are {images.shape[-1]} pixels wide, not {self.input_size}.")
                order = torch.randperm(len(labels), generator=split_generator)
                val, train = order[:self.val_trials], order[self.val_trials:]
                test = slice(0, self.test_trials or len(test_labels))
                images, test_images = images.float() / 255.0, test_images.float() / 255.0
                self._splits = {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
                                "test": (test_images[test], test_labels[test])}
        return self._splits

    def as_sequences(self, images: Tensor, labels: Tensor) -> Batch:
        """Images (B, H, W) and labels (B,) -> a batch of row-by-row trials."""
        inputs = images.repeat_interleave(self.steps_per_row, dim=1)  # (B, H * steps_per_row, W)
        steps = inputs.shape[1]
        mask = torch.zeros(len(labels), steps)
        mask[:, -1] = 1.0
        return {"inputs": inputs, "targets": labels[:, None].expand(-1, steps).contiguous(), "mask": mask,
                "images": images}

    def generate(self, n_trials: int, generator: torch.Generator) -> Batch:
        images, labels = self.splits()["train"]
        self.require(n_trials <= len(labels), f"batch_size={n_trials} is larger than the {len(labels)} "
                                              "training images; lower batch_size.")
        picked = torch.randperm(len(labels), generator=generator)[:n_trials]
        return self.as_sequences(images[picked], labels[picked])

    def fixed_set(self, stream: str) -> list[Batch]:
        """The held-out validation or test images, in batches of batch_size."""
        if stream not in self._fixed:
            images, labels = self.splits()[stream]
            self._fixed[stream] = [self.as_sequences(images[i:i + self.batch_size], labels[i:i + self.batch_size])
                                   for i in range(0, len(labels), self.batch_size)]
        return self._fixed[stream]

    def metrics(self) -> MetricCollection:
        return MetricCollection({"accuracy": Scored(MulticlassAccuracy(num_classes=10, average="micro"), last_step)})

    def plot_trial(self, batch: Batch, outputs: Tensor, rates: Tensor | None = None, index: int = 0):
        """The image, and the class probabilities against time with the true class bold."""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(9, 3.2))
        image, probabilities = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.5]})
        image.imshow(batch["images"][index].detach().cpu().numpy(), cmap="gray_r")
        label = int(batch["targets"][index, -1])
        image.set_title(f"digit {label}, read row by row")
        image.axis("off")
        p = torch.softmax(outputs[index].detach().float().cpu(), -1).numpy()
        for c in range(p.shape[-1]):
            probabilities.plot(p[:, c], lw=2.5 if c == label else 0.8, label=str(c) if c == label else None)
        probabilities.set_xlabel("time step (scored at the last)")
        probabilities.set_ylabel("p(class)")
        probabilities.legend(title="true class", fontsize="small")
        figure.tight_layout()
        return figure


def last_step(outputs: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """(predicted class, true class) at the last time step."""
    return outputs[:, -1].argmax(-1), batch["targets"][:, -1]
