"""MotorNet effectors (muscle-driven arms) as bodies for the ArmController.

MotorNet's `Effector.step` mutates `effector.states`; its `ode`,
`integration_step`, `get_geometry`, `joint2cartesian` and the muscle's
`get_initial_muscle_state` and `clip_activation` are pure torch functions. The
wrapper below calls those as they are and carries the state dict
{"joint", "muscle", "geometry"} explicitly, which is exactly what
`Effector._euler` does minus the write into `effector.states`.
Needs the optional extra: pip install "lightning-sofo[motornet]".
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .arm import Body

State = dict[str, Tensor]


def import_motornet():
    try:
        import motornet
    except ImportError as error:
        raise ImportError(
            "MotorNet bodies need the optional dependency motornet: pip install \"lightning-sofo[motornet]\" "
            "(or pip install motornet==0.3.0)."
        ) from error
    return motornet


class MotorNetBody(Body):
    """A MotorNet effector, e.g. RigidTendonArm26 with RigidTendonHillMuscle, as a pure Body.

    Args:
        effector: name of a class in motornet.effector (e.g. "RigidTendonArm26").
        muscle: name of a class in motornet.muscle (e.g. "RigidTendonHillMuscle").
        timestep: dt of the effector in seconds.
        start_angles_deg: start joint angles (degrees), velocities zero.
        effector_kwargs: more keyword arguments for the effector class.

    Action: muscle excitations in [min_activation, 1] (B, n_muscles); the
    controller's motor readout goes through a sigmoid (`motor_command`) first.
    Feedback (B, 2 M + 2), zero at the start posture: each muscle's length and
    velocity divided by its optimal length (proprioception), and the fingertip
    position in m (vision).
    """

    def __init__(
        self,
        effector: str = "RigidTendonArm26",
        muscle: str = "RigidTendonHillMuscle",
        timestep: float = 0.01,
        start_angles_deg: tuple[float, float] = (45.0, 90.0),
        effector_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        motornet = import_motornet()
        for module, name in ((motornet.effector, effector), (motornet.muscle, muscle)):
            if not isinstance(getattr(module, name, None), type):
                known = sorted(n for n, v in vars(module).items() if isinstance(v, type) and not n.startswith("_"))
                raise ValueError(f"{module.__name__} has no class {name!r}; choose one of {known}.")
        self.effector = getattr(motornet.effector, effector)(
            muscle=getattr(motornet.muscle, muscle)(), timestep=timestep, **(effector_kwargs or {})
        )
        if self.effector.integration_method != "euler":
            raise ValueError("MotorNetBody integrates with MotorNet's Euler step; use integration_method='euler'.")
        self.dt = self.effector.dt
        self.action_size = self.effector.n_muscles
        self.feedback_size = 2 * self.effector.n_muscles + 2
        names = self.effector.muscle.state_name
        self.length_row, self.velocity_row = names.index("muscle length"), names.index("muscle velocity")
        self.register_buffer(
            "start_joint", torch.tensor([math.radians(a) for a in start_angles_deg] + [0.0, 0.0]), persistent=False
        )
        self.register_buffer("start_feedback", torch.zeros(self.feedback_size), persistent=False)
        self.start_feedback = self.feedback(self.initial_state(1, like=self.start_joint))[0].detach()

    def initial_state(self, batch_size: int, like: Tensor) -> State:
        joint = self.start_joint.to(like).expand(batch_size, -1)
        geometry = self.effector.get_geometry(joint)
        muscle = self.effector.muscle.get_initial_muscle_state(batch_size, geometry).to(like)
        return {"joint": joint, "muscle": muscle, "geometry": geometry}

    def motor_command(self, readout: Tensor) -> Tensor:
        return torch.sigmoid(readout)

    def step(self, state: State, action: Tensor) -> State:
        """Effector._euler without the write into effector.states, n_ministeps times."""
        effector = self.effector
        excitation = effector.muscle.clip_activation(action)
        for _ in range(effector.n_ministeps):
            derivative = effector.ode(excitation, state, effector.default_endpoint_load, effector.default_joint_load)
            state = effector.integration_step(effector.minidt, state_derivative=derivative, states=state)
        return state

    def feedback(self, state: State) -> Tensor:
        optimal_length = self.effector.muscle.l0_ce.reshape(1, -1)
        lengths = state["muscle"][:, self.length_row] / optimal_length
        velocities = state["muscle"][:, self.velocity_row] / optimal_length
        fingertip = self.effector.joint2cartesian(state["joint"])[:, :2]
        return torch.cat([lengths, velocities, fingertip], dim=-1) - self.start_feedback.to(fingertip)

    def hand(self, state: State) -> Tensor:
        return self.effector.joint2cartesian(state["joint"])
