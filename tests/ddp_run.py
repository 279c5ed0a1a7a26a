"""Run by tests/test_ddp.py as a script (Lightning's DDP launcher re-runs it for rank 1):
a few SOFO steps of a float64 TinyRNN on one global batch of 8 trials, under strategy
"sofo" (1 process, batch 8) or "sofo_ddp" (2 gloo processes, 4 trials each).

    python tests/ddp_run.py STRATEGY STEPS OUT [--resume CKPT] [--adaptive] [--devices D --num-nodes M]

--devices/--num-nodes: processes per node and nodes when a cluster launcher (torchrun, SLURM's srun)
started the processes; without them Lightning's own launcher starts 2 processes for sofo_ddp.

Rank 0 writes OUT (parameters, communication count, step count) and OUT.ckpt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import TinyRNN  # noqa: E402

import lightning_sofo  # noqa: E402,F401  (registers the strategies)

GLOBAL_BATCH, K, HIDDEN = 8, 12, 48
TRAFFIC = [0]  # numbers passed to torch.distributed collectives


def count_collectives():
    """Wrap torch.distributed's collectives so that every number sent is counted."""
    import torch.distributed as dist

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce"):
        original = getattr(dist, name)

        def counted(tensor, *args, _original=original, **kwargs):
            TRAFFIC[0] += tensor.numel() if isinstance(tensor, torch.Tensor) else sum(t.numel() for t in tensor)
            return _original(tensor, *args, **kwargs)

        setattr(dist, name, counted)


class TrafficPerStep(L.Callback):
    def __init__(self):
        self.per_step = []

    def on_train_batch_start(self, *args):
        TRAFFIC[0] = 0

    def on_train_batch_end(self, *args):
        self.per_step.append(TRAFFIC[0])


def trials(masked: str | None = None):
    """The global batch. masked="odd": trials 1, 3, 5, 7 score nothing (rank 1's whole shard under
    Lightning's distributed sampler); masked="all": no trial scores anything."""
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(GLOBAL_BATCH, 6, 2, generator=g, dtype=torch.float64)
    targets = torch.cumsum(inputs, 1) * 0.3
    mask = (torch.rand(GLOBAL_BATCH, 6, 1, generator=g) > 0.3).double()  # uneven counts per shard
    if masked == "odd":
        mask[1::2] = 0.0
    elif masked == "all":
        mask.zero_()
    return [{"inputs": inputs[i], "targets": targets[i], "mask": mask[i]} for i in range(GLOBAL_BATCH)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy")
    parser.add_argument("steps", type=int)
    parser.add_argument("out")
    parser.add_argument("--resume")
    parser.add_argument("--adaptive", action="store_true")
    parser.add_argument("--gradient-tangents", action="store_true")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--masked", choices=["odd", "all"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = args.devices or (2 if args.strategy == "sofo_ddp" else 1)
    world = devices * args.num_nodes
    L.seed_everything(0, verbose=False)
    damping = "adaptive" if args.adaptive else 1e-3
    extra = dict(gradient_tangents=1) if args.gradient_tangents else {}
    model = TinyRNN(hidden=HIDDEN, sofo=dict(lr=0.7, tangents=K, damping=damping, seed=5, **extra)).double()
    if os.environ.get("LOCAL_RANK") == "1":  # rank 1 starts elsewhere: the strategy must broadcast rank 0's
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
    count_collectives()
    traffic = TrafficPerStep()
    trainer = L.Trainer(
        strategy=args.strategy, accelerator="cpu", devices=devices, num_nodes=args.num_nodes, max_steps=args.steps,
        precision="64-true",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[traffic],
    )
    loader = DataLoader(trials(args.masked), batch_size=GLOBAL_BATCH // world, shuffle=False)
    trainer.fit(model, loader, ckpt_path=args.resume)
    trainer.save_checkpoint(args.out + ".ckpt")
    optimizer = trainer.optimizers[0]
    estimates = {name: optimizer.state[p]["gradient_estimate"].clone()
                 for name, p in model.named_parameters() if "gradient_estimate" in optimizer.state[p]}
    if trainer.global_rank == 1:
        torch.save({"params": {name: p.detach().clone() for name, p in model.named_parameters()},
                    "gradient_estimates": estimates}, args.out + ".rank1")
    if trainer.global_rank == 0:
        torch.save({
            "traffic_per_step": traffic.per_step,
            "params": {name: p.detach().clone() for name, p in model.named_parameters()},
            "numbers_communicated": getattr(trainer.strategy, "numbers_communicated", 0),
            "step_count": optimizer.step_count,
            "num_params": sum(p.numel() for p in model.parameters()),
            "damping": optimizer.damping,
            "gradient_estimates": estimates,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
            "world_size": trainer.world_size,
        }, args.out)


if __name__ == "__main__":
    main()
