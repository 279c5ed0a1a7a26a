"""Sequential digits: trials are the images read row by row, the splits are fixed and
disjoint, and the IDX reader reads what an IDX writer wrote."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from lightning_sofo.datamodules import SequentialDigits
from lightning_sofo.datamodules.digits import MNIST_FILES, read_idx


def write_idx(path, array: np.ndarray, type_code: int = 0x08, compress: bool = False) -> None:
    big_endian = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    payload = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload += array.astype(big_endian).tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


@pytest.mark.parametrize("type_code, compress", [(0x08, False), (0x08, True), (0x0C, False), (0x0D, True)])
def test_idx_reader_reads_back_what_was_written(tmp_path, type_code, compress):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, size=(5, 4, 3)) if type_code != 0x0D else rng.normal(size=(2, 7))
    path = tmp_path / ("data.idx" + (".gz" if compress else ""))
    write_idx(path, array, type_code, compress)
    read = read_idx(path)
    assert tuple(read.shape) == array.shape
    np.testing.assert_array_equal(read.numpy(), array.astype(read.numpy().dtype))


def test_idx_reader_refuses_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "short.idx"
    write_idx(path, np.zeros((3, 4, 4)))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"promises shape \(3, 4, 4\).*truncated"):
        read_idx(path)
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="is not an IDX file"):
        read_idx(tmp_path / "png")


def test_trials_are_the_images_read_row_by_row():
    task = SequentialDigits(batch_size=16, steps_per_row=3)
    batch = task.draw("train", 0)
    assert task.input_size == 8 and task.n_steps == 24 and task.output_size == 10
    assert batch["inputs"].shape == (16, 24, 8) and batch["targets"].shape == (16, 24)
    assert batch["targets"].dtype == torch.int64
    for row in range(8):  # row r is shown during steps 3r, 3r+1, 3r+2
        for repeat in range(3):
            torch.testing.assert_close(batch["inputs"][:, 3 * row + repeat], batch["images"][:, row])
    assert batch["mask"][:, :-1].eq(0).all() and batch["mask"][:, -1].eq(1).all()
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() <= 1 and batch["inputs"].max() > 0.9
    assert (batch["targets"] == batch["targets"][:, :1]).all()


def test_splits_are_disjoint_fixed_and_independent_of_the_training_seed():
    first, second = SequentialDigits(seed=0), SequentialDigits(seed=1)
    splits = first.splits()
    assert [len(labels) for _, labels in splits.values()] == [1197, 300, 300]
    flat = {name: {tuple(image.flatten().tolist()) for image in images} for name, (images, _) in splits.items()}
    # the 8x8 digits hold a few exact duplicate images; a held-out image rarely also appears in training
    assert len(flat["test"] & flat["train"]) <= 3 and len(flat["val"] & flat["test"]) <= 1
    torch.testing.assert_close(second.fixed_set("test")[0]["inputs"], first.fixed_set("test")[0]["inputs"])
    assert sum(len(b["targets"]) for b in first.fixed_set("val")) == 300
    # training batches: the same for the same (seed, index), different across seeds
    torch.testing.assert_close(first.draw("train", 4)["inputs"], SequentialDigits(seed=0).draw("train", 4)["inputs"])
    assert not torch.equal(first.draw("train", 4)["inputs"], second.draw("train", 4)["inputs"])


def test_reads_mnist_from_a_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (("train", 20), ("test", 6)):
        images_name, labels_name = MNIST_FILES[split]
        write_idx(tmp_path / f"{images_name}.gz", rng.integers(0, 256, size=(count, 28, 28)), compress=True)
        write_idx(tmp_path / labels_name, rng.integers(0, 10, size=(count,)))
    task = SequentialDigits(mnist_dir=str(tmp_path), batch_size=4, val_trials=5)
    assert task.input_size == 28 and task.n_steps == 28
    splits = task.splits()
    assert [len(labels) for _, labels in splits.values()] == [15, 5, 6]  # the whole t10k file is the test set
    test_images = read_idx(tmp_path / f"{MNIST_FILES['test'][0]}.gz").float() / 255
    torch.testing.assert_close(splits["test"][0], test_images)
    batch = task.draw("train", 0)
    assert batch["inputs"].shape == (4, 28, 28)


def test_missing_mnist_files_name_what_is_expected(tmp_path):
    task = SequentialDigits(mnist_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte.*mnist_dir=None"):
        task.splits()


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="steps_per_row must be a positive integer"):
        SequentialDigits(steps_per_row=0)
    with pytest.raises(ValueError, match="leaves no training images"):
        SequentialDigits(val_trials=1000, test_trials=900).splits()
    with pytest.raises(ValueError, match="larger than the 1197 training images"):
        SequentialDigits(batch_size=2000).draw("train", 0)


def test_accuracy_metric_scores_the_last_step():
    task = SequentialDigits(batch_size=8)
    batch = task.draw("train", 0)
    logits = torch.zeros(8, 8, 10)
    logits[:, -1] = torch.nn.functional.one_hot(batch["targets"][:, -1], 10).float()
    logits[:4, -1] = torch.nn.functional.one_hot((batch["targets"][:4, -1] + 1) % 10, 10).float()
    logits[:, :-1, 0] = 5.0  # earlier steps are not scored
    metrics = task.metrics()
    metrics.update(logits, batch)
    assert metrics.compute()["accuracy"] == pytest.approx(0.5)


def test_figure_shows_the_image_and_the_class_probabilities():
    task = SequentialDigits(batch_size=2)
    batch = task.draw("train", 0)
    figure = task.plot_trial(batch, torch.randn(2, 8, 10))
    assert len(figure.axes) == 2 and figure.axes[0].images
