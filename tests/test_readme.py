"""The README's example runs as written, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_trains():
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"## Example\n\n```python\n(.*?)```", readme, re.S).group(1)
    example = example.replace("max_steps=50", "max_steps=20, logger=False, enable_checkpointing=False")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    model_cls, batch = namespace["ContextNet"], namespace["batch"]
    import torch

    torch.manual_seed(0)
    model = model_cls()
    start = model.compute_loss(batch).item()
    import lightning as L
    from torch.utils.data import DataLoader

    L.Trainer(strategy="sofo", max_steps=20, logger=False, enable_checkpointing=False).fit(
        model, DataLoader([batch], batch_size=None)
    )
    assert model.compute_loss(batch).item() < 0.5 * start


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
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    closing = closing_line(result.stderr)
    trained = float(re.search(r"val_loss ([0-9.e-]+)", closing).group(1).rstrip("."))
    assert "lightning_logs" in closing and "last checkpoint" in closing.lower()

    import lightning as L

    untrained = SOFOCLI(run=False, args=["--config", config, "--trainer.logger", "false"])  # same seed: same start
    start = L.Trainer(logger=False, enable_progress_bar=False).validate(untrained.model, untrained.datamodule,
                                                                       verbose=False)[0]["val_loss"]
    assert trained < 0.7 * start, (start, trained)
