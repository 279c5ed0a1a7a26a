"""One seed derivation (lightning_sofo.seeds.mixed_seed) for tangents, trials and noise. The values
are pinned: the training study compares new runs with saved ones on the same trials and tangents,
so the streams must never change silently."""

from __future__ import annotations

import pytest
import torch

from lightning_sofo.seeds import mixed_seed
from lightning_sofo.tasks import stream_seed


def test_the_task_streams_are_the_ones_the_saved_study_runs_drew():
    assert stream_seed(0, "train", 0) == 0
    assert stream_seed(3, "val", 11, 1) == 6186501524130766007
    assert stream_seed(2**40, "test", 5) == 3548297462348421136


def test_the_tangent_stream_is_the_one_the_saved_study_runs_drew():
    from lightning_sofo.tangents import step_generator

    expected = torch.Generator().manual_seed(6951296038660815686)
    ours = step_generator(7, 12, torch.device("cpu"), stream=1)
    assert torch.equal(torch.randn(5, generator=ours), torch.randn(5, generator=expected))


def test_keys_in_every_position_and_strings_change_the_seed():
    base = mixed_seed(1, 2, 3, "train")
    assert len({base, mixed_seed(2, 2, 3, "train"), mixed_seed(1, 3, 3, "train"), mixed_seed(1, 2, 4, "train"),
                mixed_seed(1, 2, 3, "val/0")}) == 5
    assert mixed_seed(1, 2, 3, "train") == base, "a pure function of its keys"
    assert 0 <= base < 2**63 - 1
    with pytest.raises(ValueError, match="at most 4 keys"):
        mixed_seed(1, 2, 3, 4, 5)
