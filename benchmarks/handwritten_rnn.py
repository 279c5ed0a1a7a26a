"""Hand-written forward-mode sketches of models.VanillaRNN: the lower bound for the generic engine.

The tangent equations of h_{t+1} = (1 - a) h_t + a (W phi(h_t) + U u_t + b), y_t = C phi(h_{t+1}) + d,
written out (r = phi(h), r' = phi'(h), tangents dW, dU, db, dC, dd of shape (K, ...)):
    dh_{t+1} = (1 - a) dh_t + a ((r'_t * dh_t) W^T + r_t dW^T + u_t dU^T + db)
    dy_t     = (r'_{t+1} * dh_{t+1}) C^T + r_{t+1} dC^T + dd
and the masked-MSE sketches accumulated in place, g~ += dy . (2/n) m (y - t), G~ += (2/n) (m dy) dy^T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sofo.sketch import Sketch


@torch.no_grad()
def handwritten_sketch(model, tangents: dict[str, Tensor], inputs: Tensor, targets: Tensor, mask: Tensor) -> Sketch:
    """Sketch of model (a tanh VanillaRNN with h_0 = 0, not learned) on (inputs, targets, mask)."""
    W, U, b, C, d = model.cell.recurrent, model.cell.input_weights, model.cell.bias, model.readout, model.readout_bias
    dW, dU, db, dC, dd = (tangents[n] for n in ["cell.recurrent", "cell.input_weights", "cell.bias", "readout", "readout_bias"])
    k, (batch, horizon, _), n_units = dW.shape[0], inputs.shape, W.shape[0]
    a = model.cell.alpha
    mask = torch.broadcast_to(mask, targets.shape)
    normaliser = mask.sum()
    h = model.cell.h0.detach().expand(batch, n_units)
    dh = torch.zeros(k, batch, n_units, dtype=W.dtype)
    grad = torch.zeros(k, dtype=W.dtype)
    ggn = torch.zeros(k, k, dtype=W.dtype)
    loss = torch.zeros((), dtype=W.dtype)
    r = torch.tanh(h)
    for t in range(horizon):
        u = inputs[:, t]
        slope = 1 - r * r
        drive = r @ W.T + u @ U.T + b
        ddrive = (slope * dh) @ W.T + torch.matmul(r, dW.transpose(1, 2)) + torch.matmul(u, dU.transpose(1, 2))
        ddrive += db[:, None, :]
        h = (1 - a) * h + a * drive
        dh = (1 - a) * dh + a * ddrive
        r = torch.tanh(h)
        y = r @ C.T + d
        dy = ((1 - r * r) * dh) @ C.T + torch.matmul(r, dC.transpose(1, 2)) + dd[:, None, :]
        m = mask[:, t]
        residual = y - targets[:, t]
        loss += (m * residual * residual).sum()
        flat = dy.reshape(k, -1)
        grad.addmv_(flat, (m * residual).reshape(-1), alpha=2.0)
        ggn.addmm_(flat * m.reshape(1, -1), flat.T, alpha=2.0)
    return Sketch(loss / normaliser, grad / normaliser, ggn / normaliser)
