"""Runs a lab can trust: the right checkpoint, the config's settings on resume, exact resumes with
noise, atomic checkpoint writes, and clear refusals of checkpoints that do not fit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_sofo.checkpoints import AtomicCheckpointIO, CheckpointError, check_matches, read_checkpoint
from lightning_sofo.cli import main
from test_cli import run_dir, shrunk

NOISE = ["--model.init_args.input_noise", "0.1", "--model.init_args.recurrent_noise", "0.1",
         "--model.init_args.output_noise", "0.05"]


def fit(config: str, root: Path, steps: int, *extra: str) -> None:
    args = shrunk(config, root)
    args[args.index("--trainer.max_steps") + 1] = str(steps)
    main(args + list(extra))


def last(root: Path, config: str = "flipflop_sofo", version: int = 0) -> dict:
    return torch.load(run_dir(root, config, version) / "checkpoints" / "last.ckpt", weights_only=False)


def expect_refusal(capsys, *args: str) -> str:
    """Run the command; it must stop with exit status 2 and return its message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(list(args))
    assert stopped.value.code == 2
    return capsys.readouterr().err


# ---- 1. run identity -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_experiments(tmp_path_factory):
    """flipflop_sofo, then flipflop_adam, trained in one directory."""
    root = tmp_path_factory.mktemp("two_experiments")
    fit("flipflop_sofo.yaml", root, 2)
    fit("flipflop_adam.yaml", root, 2)
    return root


def test_each_config_is_its_own_experiment(two_experiments):
    assert (run_dir(two_experiments, "flipflop_sofo") / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir(two_experiments, "flipflop_adam") / "checkpoints" / "last.ckpt").is_file()
    assert "sofo" in last(two_experiments, "flipflop_sofo")["optimizer_states"][0]
    assert "sofo" not in last(two_experiments, "flipflop_adam")["optimizer_states"][0]


def test_ckpt_path_last_loads_the_same_configs_checkpoint(two_experiments, caplog):
    """The Adam run was written last; `last` under flipflop_sofo must still find the SOFO run's."""
    args = shrunk("flipflop_sofo.yaml", two_experiments)
    main(["validate", *args[1:], "--ckpt_path", "last"])
    sofo_checkpoint = str(run_dir(two_experiments, "flipflop_sofo") / "checkpoints")
    loaded = [line for line in caplog.text.splitlines() if "Loading " in line]
    assert loaded and sofo_checkpoint in loaded[-1], loaded
    caplog.clear()
    fit("flipflop_sofo.yaml", two_experiments, 3, "--ckpt_path", "last")  # resumes SOFO's 2 steps, takes 1 more
    assert "Done after 3 steps" in caplog.text
    newest = max(int(p.name.split("_")[1]) for p in run_dir(two_experiments).parent.glob("version_*"))
    assert last(two_experiments, "flipflop_sofo", newest)["optimizer_states"][0]["sofo"]["step_count"] == 3


def test_another_experiments_checkpoint_is_refused_by_name(two_experiments, capsys):
    sofo_file = run_dir(two_experiments, "flipflop_sofo") / "checkpoints" / "last.ckpt"
    args = shrunk("flipflop_adam.yaml", two_experiments)
    args[args.index("--trainer.max_steps") + 1] = "4"
    message = expect_refusal(capsys, *args, "--ckpt_path", str(sofo_file))
    assert str(sofo_file) in message and "SOFO" in message and "Adam" in message
    bigger = shrunk("flipflop_sofo.yaml", two_experiments)
    bigger[bigger.index("--model.init_args.hidden_size") + 1] = "16"
    message = expect_refusal(capsys, *bigger, "--ckpt_path", str(sofo_file))
    assert str(sofo_file) in message and "shapes differ" in message and "(8, 8) in the file, (16, 16) here" in message
    message = expect_refusal(capsys, "analyse", "--ckpt_path", str(sofo_file), *bigger[1:])
    assert "shapes differ" in message


# ---- 2. the config's settings win on resume --------------------------------------------------
def test_resumed_run_takes_the_new_settings_and_records_them(tmp_path, caplog):
    fit("flipflop_sofo.yaml", tmp_path, 2, "--optimizer.init_args.damping", "0.001", "--optimizer.init_args.lr", "0.5")
    before = last(tmp_path)["optimizer_states"][0]
    assert (before["sofo"]["tangents"], before["sofo"]["damping"], before["param_groups"][0]["lr"]) == (8, 1e-3, 0.5)
    fit("flipflop_sofo.yaml", tmp_path, 4, "--ckpt_path", "last", "--optimizer.init_args.damping", "0.5",
        "--optimizer.init_args.lr", "0.1", "--optimizer.init_args.tangents", "4")
    after = last(tmp_path, version=1)["optimizer_states"][0]
    assert (after["sofo"]["tangents"], after["sofo"]["damping"], after["param_groups"][0]["lr"]) == (4, 0.5, 0.1)
    assert after["sofo"]["step_count"] == 4  # the state (tangent stream) continued
    assert "damping 0.001 -> 0.5" in caplog.text and "lr 0.5 -> 0.1" in caplog.text and "tangents 8 -> 4" in caplog.text
    saved = yaml.safe_load((run_dir(tmp_path, version=1) / "config.yaml").read_text())["optimizer"]["init_args"]
    assert (saved["damping"], saved["lr"], saved["tangents"]) == (0.5, 0.1, 4)  # the config file is what ran


def test_resume_with_the_same_config_keeps_the_adaptive_damping_reached(tmp_path, caplog):
    """The adaptive damping is state: 2 + 2 steps with a resume end where 4 straight steps do."""
    adaptive = ("--optimizer.init_args.damping", "adaptive")
    fit("flipflop_sofo.yaml", tmp_path / "straight", 4, *adaptive)
    fit("flipflop_sofo.yaml", tmp_path / "resumed", 2, *adaptive)
    reached = last(tmp_path / "resumed")["optimizer_states"][0]["sofo"]["damping"]
    fit("flipflop_sofo.yaml", tmp_path / "resumed", 4, *adaptive, "--ckpt_path", "last")
    straight, resumed = last(tmp_path / "straight"), last(tmp_path / "resumed", version=1)
    assert reached != 1e-3 and reached != straight["optimizer_states"][0]["sofo"]["damping"]
    assert resumed["optimizer_states"][0]["sofo"] == straight["optimizer_states"][0]["sofo"]
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in straight["state_dict"].items())
    assert "replace the checkpoint's" not in caplog.text  # nothing changed, nothing reported


def test_resumed_adam_run_takes_the_new_lr(tmp_path):
    fit("flipflop_adam.yaml", tmp_path, 2)
    fit("flipflop_adam.yaml", tmp_path, 4, "--ckpt_path", "last", "--optimizer.init_args.lr", "0.002")
    state = last(tmp_path, "flipflop_adam", 1)["optimizer_states"][0]
    assert state["param_groups"][0]["lr"] == 0.002 and state["state"][0]["step"] == 4  # Adam's moments kept


# ---- 3. exact resume with noise ------------------------------------------------------------------
@pytest.mark.parametrize("config", ["flipflop_sofo.yaml", "flipflop_adam.yaml"])
def test_noisy_run_resumed_equals_the_uninterrupted_run(config, tmp_path):
    fit(config, tmp_path / "straight", 6, *NOISE)
    fit(config, tmp_path / "resumed", 3, *NOISE)
    fit(config, tmp_path / "resumed", 6, *NOISE, "--ckpt_path", "last")
    straight, resumed = last(tmp_path / "straight", config), last(tmp_path / "resumed", config, 1)
    assert straight["global_step"] == resumed["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    fit(config, tmp_path / "quiet", 6)
    quiet = last(tmp_path / "quiet", config)
    assert not all(torch.equal(v, quiet["state_dict"][k]) for k, v in straight["state_dict"].items()), \
        "the noise changes the result, so the comparison above can fail"


# ---- 4. atomic checkpoints ------------------------------------------------------------------------
# One process imports torch once and forks a writer per kill: each writer keeps rewriting the checkpoint
# and is SIGKILLed `delay` seconds after its first whole write (a fresh interpreter per kill spent 7 s importing).
KILLER = textwrap.dedent("""
    import os, signal, sys, time, torch
    from lightning_sofo.checkpoints import AtomicCheckpointIO
    target = sys.argv[1]
    for line in sys.stdin:
        delay = float(line)
        first_write, told = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(first_write)
            io, version = AtomicCheckpointIO(), 0
            while True:
                version += 1
                payload = torch.full((4_000_000,), float(version))  # 16 MB: a write takes a while
                io.save_checkpoint({"state_dict": {"w": payload}, "pytorch-lightning_version": "2",
                                    "version": version}, target)
                if version == 1:
                    os.write(told, b"1")
        os.close(told)
        started = os.read(first_write, 1) == b"1"
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(first_write)
        print("killed" if started else "not started", flush=True)
""")


def test_a_kill_at_any_moment_of_a_write_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL a process that keeps rewriting one checkpoint, with TMPDIR on another filesystem
    (/dev/shm), at many moments; the file is always a whole checkpoint (the old or the new one),
    and the next write clears the temporary file a kill left behind."""
    shm = Path("/dev/shm")
    tmpdir = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    target = tmp_path / "checkpoints" / "last.ckpt"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "TMPDIR": str(tmpdir), "OMP_NUM_THREADS": "1"}
    delays = [0.0, 0.003, 0.007, 0.011, 0.017, 0.023, 0.031, 0.043, 0.057, 0.071, 0.089, 0.13]
    killer = subprocess.Popen([sys.executable, str(script), str(target)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True)
    try:
        for delay in delays:
            killer.stdin.write(f"{delay}\n")
            killer.stdin.flush()
            assert killer.stdout.readline().strip() == "killed", "the writer did not start"
            checkpoint = read_checkpoint(target)
            assert torch.all(checkpoint["state_dict"]["w"] == checkpoint["version"]), "a checkpoint of mixed writes"
    finally:
        killer.stdin.close()
        killer.wait(timeout=60)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "pytorch-lightning_version": "2"}, target)
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"], "temporary files were left behind"


def test_an_unreadable_newest_checkpoint_is_skipped_for_the_newest_readable(tmp_path, caplog):
    fit("flipflop_sofo.yaml", tmp_path, 2)
    folder = run_dir(tmp_path) / "checkpoints"
    periodic = next(p for p in folder.iterdir() if p.name != "last.ckpt")
    broken = folder / "last.ckpt"
    broken.write_bytes(broken.read_bytes()[:1000])  # truncated by a kill during a non-atomic copy
    os.utime(broken, (time.time() + 5, time.time() + 5))  # and the newest file
    with pytest.warns(UserWarning, match="skipping an unreadable checkpoint") as warned:
        fit("flipflop_sofo.yaml", tmp_path, 3, "--ckpt_path", "last")
    assert any(str(broken.resolve()) in str(w.message) for w in warned)
    assert f"Loading {periodic.resolve()}" in caplog.text
    assert last(tmp_path, version=1)["optimizer_states"][0]["sofo"]["step_count"] == 3


def test_an_explicit_unreadable_checkpoint_names_the_readable_one_beside_it(tmp_path, capsys):
    fit("flipflop_sofo.yaml", tmp_path, 2)
    folder = run_dir(tmp_path) / "checkpoints"
    (folder / "last.ckpt").write_bytes(b"")
    args = shrunk("flipflop_sofo.yaml", tmp_path)
    message = expect_refusal(capsys, *args, "--ckpt_path", str(folder / "last.ckpt"))
    assert "is empty (0 bytes)" in message and "The newest readable checkpoint beside it is" in message


# ---- 6. checkpoint files that cannot be used: clear errors, nothing touched ------------------------
@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    fit("flipflop_sofo.yaml", root, 2)
    return (run_dir(root) / "checkpoints" / "last.ckpt").read_bytes()


def _spoiled_files(data: bytes):
    return st.one_of(
        st.binary(max_size=4096).map(lambda b: ("random bytes", b)),
        st.integers(0, len(data) - 1).map(lambda n: ("truncated", data[:n])),
        st.integers(0, len(data) - 1).map(lambda n: ("one byte changed", data[:n] + bytes([data[n] ^ 0xFF]) + data[n + 1:])),
        st.sampled_from(["tensor", "dict", "list", "numbers"]).map(lambda kind: ("another library's", kind)),
    )


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_checkpoint_files_are_refused_clearly(data, real_checkpoint, tmp_path_factory):
    from lightning_sofo.models import VanillaRNN

    kind, content = data.draw(_spoiled_files(real_checkpoint))
    path = tmp_path_factory.mktemp("fuzz") / "spoiled.ckpt"
    if kind == "another library's":
        payload = {"tensor": torch.ones(3), "dict": {"weights": torch.ones(2)}, "list": [1, 2], "numbers": 3.5}[content]
        torch.save(payload, path)
    else:
        path.write_bytes(content)
    model = VanillaRNN(3, 8, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        assert str(path) in str(error)
    else:  # a flipped byte that no checksum covers (zip directory padding) can leave a usable file
        assert kind == "one byte changed", kind
        check_matches(model, checkpoint, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [p.name for p in path.parent.iterdir()] == ["spoiled.ckpt"]


def test_a_checkpoint_of_another_config_is_refused(real_checkpoint, tmp_path):
    from lightning_sofo.models import VanillaRNN

    path = tmp_path / "other.ckpt"
    path.write_bytes(real_checkpoint)
    with pytest.raises(CheckpointError, match=r"other.ckpt does not fit this VanillaRNN .*shapes differ"):
        check_matches(VanillaRNN(3, 16, 3), read_checkpoint(path), path)


# ---- analyse: bad options are refused before anything is written -----------------------------------
@pytest.mark.parametrize("option, message", [
    (["--trials", "0"], "must be a positive integer"),
    (["--constant_input", "1", "2"], "--constant_input has 2 numbers but VanillaRNN has 3 input channels"),
    (["--out", "FILE"], "is a file; give a folder"),
])
def test_analyse_refuses_bad_options(option, message, two_experiments, capsys):
    config = shrunk("flipflop_sofo.yaml", two_experiments)[1:]
    if option[-1] == "FILE":
        option = ["--out", str(two_experiments / "a_file.txt")]
        (two_experiments / "a_file.txt").write_text("x")
    with pytest.raises(SystemExit) as stopped:
        main(["analyse", "--ckpt_path", "last", *option, *config])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


# ---- resuming under a learning-rate schedule; checkpoint files stay readable by the lab --------------
def scheduled_rnn(lr: float):
    """A TinyRNN trained by Adam with the lr halved at every step (StepLR)."""
    from conftest import TinyRNN

    torch.manual_seed(0)
    model = TinyRNN()

    def configure_optimizers():
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    model.configure_optimizers = configure_optimizers
    return model


def _fit_scheduled(model, steps, ckpt_path=None, root=None):
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning.pytorch.callbacks import ModelCheckpoint

    batches = [(torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(i)), torch.zeros(3, 4, 2)) for i in range(8)]
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True, every_n_train_steps=1)] if root else []
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=bool(root), callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer.optimizers[0].param_groups[0]["lr"]


def test_resume_keeps_the_schedule_and_applies_a_new_base_lr(tmp_path, caplog):
    straight = _fit_scheduled(scheduled_rnn(1e-2), 4)
    _fit_scheduled(scheduled_rnn(1e-2), 2, root=tmp_path)
    resumed = _fit_scheduled(scheduled_rnn(1e-2), 4, ckpt_path=tmp_path / "last.ckpt")
    assert resumed == straight == 1e-2 * 0.5**4  # the schedule's progress is state: kept
    assert "replace the checkpoint's" not in caplog.text
    changed = _fit_scheduled(scheduled_rnn(2e-2), 4, ckpt_path=tmp_path / "last.ckpt")
    assert changed == pytest.approx(2e-2 * 0.5**4)  # a new base lr from the config, on the same schedule
    assert "lr 0.01 -> 0.02" in caplog.text


def test_checkpoints_are_readable_by_the_group(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "pytorch-lightning_version": "2"}, target)
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
