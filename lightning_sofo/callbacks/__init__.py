"""Lightning callbacks for lightning_sofo's runs, one concept a module, all importable from here (a
config names them `class_path: lightning_sofo.callbacks.Perturbation`):

- checkpointing: LastCheckpoint (last.ckpt holds the end of fit) and CheckpointOnInterrupt (a
  checkpoint written when a signal stops the run);
- monitoring: TrialFigures (trials drawn at each validation), FixedPointFigures (fixed points at the
  end of fit) and CurvatureMonitor (the loss's curvature during training), logged to the Trainer's
  loggers;
- predictions: PredictionsToFile (what predict ran on, written to predictions.npz);
- experiments: Perturbation (lesions and pulses during evaluation, through the model's hook
  Perturbable) and Curriculum (a task's difficulty stepped during training).

What they compute on trials is lightning_sofo.trials.
"""

from lightning_sofo.callbacks.checkpointing import CheckpointOnInterrupt, LastCheckpoint
from lightning_sofo.callbacks.experiments import Curriculum, Perturbable, Perturbation
from lightning_sofo.callbacks.monitoring import CurvatureMonitor, FixedPointFigures, TrialFigures
from lightning_sofo.callbacks.predictions import PredictionsToFile

__all__ = [
    "CheckpointOnInterrupt",
    "Curriculum",
    "CurvatureMonitor",
    "FixedPointFigures",
    "LastCheckpoint",
    "Perturbable",
    "Perturbation",
    "PredictionsToFile",
    "TrialFigures",
]
