"""The README's example runs as written, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import THREADS

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"## Example\n\n```python\n(.*?)```", readme, re.S).group(1)


def run_example(seed: int = 0) -> dict:
    """Run the example as printed, with the given seed and without writing logs or checkpoints."""
    example = readme_example()
    assert "torch.manual_seed(0)" in example and "max_steps=50," in example
    example = example.replace("torch.manual_seed(0)", f"torch.manual_seed({seed})").replace(
        "max_steps=50,", "max_steps=50, logger=False, enable_checkpointing=False, enable_progress_bar=False,")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    return namespace


def held_out_losses(namespace: dict) -> tuple[float, float]:
    """The trained model's loss on the example's validation trials, and the loss of predicting zero there."""
    [batch] = list(namespace["validation"])
    return namespace["model"].compute_loss(batch).item(), float((batch["targets"] ** 2).mean())


def test_readme_example_trains_as_written():
    """The example exactly as printed (seeded) trains without a warning about its own setup, and
    ends far below predicting zero on trials it never trained on."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        namespace = run_example()
    setup_warnings = [str(w.message) for w in caught if "dataloader" in str(w.message).lower()]
    assert not setup_warnings, setup_warnings  # e.g. "validation_step but no val_dataloader"
    loss, predicting_zero = held_out_losses(namespace)
    assert predicting_zero > 0.05 and loss < predicting_zero / 20


@pytest.mark.parametrize("seed", range(1, 5))
def test_readme_example_succeeds_on_every_seed(seed):
    """Over 4 more seeds (weights and trials), 50 steps end at least 20x below the loss of predicting zero
    on held-out trials."""
    loss, predicting_zero = held_out_losses(run_example(seed))
    assert loss < predicting_zero / 20, (loss, predicting_zero)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n.*?\n(python -m pytest[^\n]*)\n```", readme, re.S).group(1)
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == command


def test_main_job_as_the_readme_gives_it_lowers_the_loss(tmp_path):
    """The README's first command, shortened to 30 steps, from another directory."""
    import os
    import subprocess
    import sys

    from lightning_sofo.cli import SOFOCLI
    from test_cli import closing_line

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"## Install and run the main job\n\n```bash\n(.*?)\n```", readme, re.S).group(1)
    fit = command.split("&&")[-1].split()
    assert fit[:4] == ["sofo", "fit", "--config", "configs/context_integration_sofo.yaml"]
    config = str(ROOT / fit[3])
    short = ["--trainer.max_steps", "30", "--trainer.val_check_interval", "30", "--trainer.default_root_dir", str(tmp_path)]
    sofo = str(Path(sys.executable).with_name("sofo"))
    result = subprocess.run([sofo, *fit[1:3], config, *short], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    assert result.returncode == 0, result.stderr[-3000:]
    closing = closing_line(result.stderr)
    trained = float(re.search(r"val_loss ([0-9.e-]+)", closing).group(1).rstrip("."))
    assert "lightning_logs" in closing and "last checkpoint" in closing.lower()

    import lightning as L

    untrained = SOFOCLI(run=False, args=["--config", config, "--trainer.logger", "false"])  # same seed: same start
    start = L.Trainer(logger=False, enable_progress_bar=False).validate(untrained.model, untrained.datamodule,
                                                                       verbose=False)[0]["val_loss"]
    assert trained < 0.7 * start, (start, trained)
