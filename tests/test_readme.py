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
    model_cls, batch = namespace["Integrator"], namespace["batch"]
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
