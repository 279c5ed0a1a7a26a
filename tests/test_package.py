"""The package as a lab installs it: the built wheel (not this source tree) in a fresh virtual
environment, used from an empty directory that holds a lab's own models.py.

The fresh environment gets the wheel only; torch, Lightning and the other dependencies are the
ones this test runs under, made visible by a path file (installing them again would download
gigabytes), and `pip check` confirms that they satisfy the wheel's declared requirements.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from lightning_sofo.cli import BUNDLED_CONFIGS
from conftest import THREADS

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "lightning_sofo", "models", "datamodules", "configs")
DECOY = "raise ImportError('a lab decoy: lightning_sofo must never import this models.py')\n"
SHORT_RUN = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "4",
             "--data.init_args.val_trials", "4", "--data.init_args.n_steps", "20",
             "--model.init_args.hidden_size", "8", "--optimizer.init_args.tangents", "8"]


def run(command: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**env, "OMP_NUM_THREADS": str(THREADS)})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh virtual environment holding the wheel built from this tree."""
    root = tmp_path_factory.mktemp("package")
    source = root / "source"  # built with build isolation, as pip builds it for a user
    source.mkdir()
    for name in SOURCES:  # a clean copy, so the build leaves this checkout alone
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if
                                            (REPO / name).is_dir() else {}))
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", root / "dist",
                 source], cwd=root)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    wheel = next((root / "dist").glob("lightning_sofo-*.whl"))
    environment = root / "venv"
    venv.EnvBuilder(with_pip=False).create(environment)
    bin_dir = environment / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], root).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")  # torch, lightning, ... (not us)
    installed = run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel], cwd=root)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return bin_dir


def test_the_wheel_holds_one_namespace_and_the_configs(installed):
    wheel = next(installed.parents[1].glob("dist/*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"lightning_sofo"}, f"one import name only, found {sorted(top_level)}"
    for package in ("models", "datamodules", "configs"):
        assert f"lightning_sofo/{package}/__init__.py" in names
    shipped = {Path(name).name for name in names if name.startswith("lightning_sofo/configs/") and
               name.endswith(".yaml")}
    assert shipped == {path.name for path in BUNDLED_CONFIGS.glob("*.yaml")}


def test_the_main_job_and_analysis_run_from_an_empty_directory_with_a_decoy_models_py(installed, tmp_path):
    (tmp_path / "models.py").write_text(DECOY)
    (tmp_path / "datamodules.py").write_text(DECOY.replace("models.py", "datamodules.py"))
    python = installed / "python"
    where = run([python, "-c", "import lightning_sofo.models as m, lightning_sofo.cli as c; "
                 "print(m.__file__); print(c.BUNDLED_CONFIGS)"], tmp_path)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(str(REPO) not in line and "site-packages" in line for line in where.stdout.splitlines()), \
        f"the wheel, not this checkout, must be imported: {where.stdout}"

    # the README's main-job command as written (its config path names a bundled config), shortened
    readme = (REPO / "README.md").read_text()
    command = re.search(r"## Install and run the main job\n\n```bash\n(.*?)\n```", readme, re.S).group(1)
    main_job = command.split("&&")[-1].split()
    assert main_job[:3] == ["sofo", "fit", "--config"], main_job
    fit = run([installed / main_job[0], *main_job[1:], *SHORT_RUN], tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Done after 2 steps" in fit.stderr
    config = Path(main_job[3]).stem
    assert list((tmp_path / "lightning_logs" / config).glob("version_0/checkpoints/last.ckpt"))

    analyse = run([installed / "sofo", "analyse", "--config", config, "--ckpt_path", "last",
                   "--trials", "4", "--starts", "16", "--model.init_args.hidden_size", "8",
                   "--data.init_args.n_steps", "20", "--data.init_args.val_trials", "4"], tmp_path)
    assert analyse.returncode == 0, analyse.stderr[-3000:]
    assert list(tmp_path.rglob("fixed_points.png"))

    # python -m puts this directory first on sys.path, where the decoys are
    module = run([python, "-m", "lightning_sofo", "fit", "--config", config, *SHORT_RUN], tmp_path)
    assert module.returncode == 0, module.stderr[-3000:]


def test_no_top_level_models_or_datamodules_and_the_requirements_are_met(installed, tmp_path):
    python = installed / "python"
    for name in ("models", "datamodules"):
        result = run([python, "-c", f"import {name}"], tmp_path)
        assert result.returncode != 0 and "No module named" in result.stderr, result.stderr[-1000:]
    check = run([sys.executable, "-m", "pip", "--python", python, "check"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
