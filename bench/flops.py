"""The matrix multiplies of one GAN step, listed from the Linear layer shapes, and their FLOPs.

A Linear (in -> out) applied to n rows costs three matmuls of 2*n*in*out FLOPs each:
forward  y[n,out]  = x[n,in] @ W.T           (addmm when the layer has a bias)
wgrad    gW[out,in] = gy.T @ x                (only when W requires grad)
dgrad    gx[n,in]  = gy[n,out] @ W            (only when the input requires grad)
Bias additions, bias gradients and elementwise work are not counted: they are O(n*out).

One step of the project's trainer (``pipeline.step.train_step``, batch b per process):
D phase  G forward on z (b rows); D forward on cat(real, G(z).detach()) (2b rows);
         D backward: wgrad of every D layer, dgrad of every D layer except the first
         (its input is data, real or detached);
G phase  D forward on the D phase's G(z) (b rows, no second G forward); D is frozen, so
         D backward is dgrad only, of every layer (the gradient must reach G);
         G backward: wgrad of every G layer, dgrad of every G layer except the first (z).

With P = sum(in*out) over a network's Linears and P1 its first layer's in*out:
    trainer FLOPs per image = 2 * (3*P_G - P1_G + 8*P_D - 2*P1_D)

The plain tutorial loop (``bench.workloads.plain_step``) draws a fresh z and runs G forward a
second time in its G step, and leaves D unfrozen there, so D's weight gradients are computed too:
    plain FLOPs per image   = 2 * (4*P_G - P1_G + 9*P_D - 2*P1_D)
"""

from __future__ import annotations

from dataclasses import dataclass

Shapes = list[tuple[int, int]]


@dataclass(frozen=True)
class Matmul:
    """One matrix multiply (m x k) @ (k x n) of a training step."""

    net: str
    """G or D."""
    layer: int
    """Index of the Linear layer in its network, input side first."""
    kind: str
    """forward, wgrad or dgrad."""
    rows: int
    """Batch rows the layer is applied to."""
    fan_in: int
    fan_out: int

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.fan_in * self.fan_out


def _forward(net: str, shapes: Shapes, rows: int) -> list[Matmul]:
    return [Matmul(net, i, "forward", rows, fi, fo) for i, (fi, fo) in enumerate(shapes)]


def _backward(
    net: str, shapes: Shapes, rows: int, weights: bool, first_input: bool
) -> list[Matmul]:
    """Backward from the last layer to the first, as autograd runs it."""
    out: list[Matmul] = []
    for i in reversed(range(len(shapes))):
        fi, fo = shapes[i]
        if weights:
            out.append(Matmul(net, i, "wgrad", rows, fi, fo))
        if i > 0 or first_input:
            out.append(Matmul(net, i, "dgrad", rows, fi, fo))
    return out


def trainer_step_matmuls(shapes: dict[str, Shapes], batch: int) -> list[Matmul]:
    """Every matmul of one ``train_step`` with per-process batch ``batch``, in execution order."""
    G, D, b = shapes["G"], shapes["D"], batch
    return [
        # D phase
        *_forward("G", G, b),
        *_forward("D", D, 2 * b),
        *_backward("D", D, 2 * b, weights=True, first_input=False),
        # G phase: D frozen, G(z) reused from the D phase
        *_forward("D", D, b),
        *_backward("D", D, b, weights=False, first_input=True),
        *_backward("G", G, b, weights=True, first_input=False),
    ]


def plain_step_matmuls(shapes: dict[str, Shapes], batch: int) -> list[Matmul]:
    """Every matmul of one step of the tutorial-style loop (see module docstring)."""
    G, D, b = shapes["G"], shapes["D"], batch
    return [
        *_forward("G", G, b),
        *_forward("D", D, b),  # real
        *_forward("D", D, b),  # G(z).detach()
        # one backward() of the summed loss runs through both D graphs
        *_backward("D", D, b, weights=True, first_input=False),
        *_backward("D", D, b, weights=True, first_input=False),
        *_forward("G", G, b),  # fresh z, fresh G(z)
        *_forward("D", D, b),
        *_backward("D", D, b, weights=True, first_input=True),  # D not frozen
        *_backward("G", G, b, weights=True, first_input=False),
    ]


def step_flops(matmuls: list[Matmul]) -> int:
    return sum(m.flops for m in matmuls)


def trainer_flops_per_image(shapes: dict[str, Shapes]) -> int:
    """Closed form of ``step_flops(trainer_step_matmuls(shapes, b)) / b``."""
    pg, pd = (sum(i * o for i, o in shapes[n]) for n in ("G", "D"))
    g1, d1 = (shapes[n][0][0] * shapes[n][0][1] for n in ("G", "D"))
    return 2 * (3 * pg - g1 + 8 * pd - 2 * d1)


def plain_flops_per_image(shapes: dict[str, Shapes]) -> int:
    """Closed form of ``step_flops(plain_step_matmuls(shapes, b)) / b``."""
    pg, pd = (sum(i * o for i, o in shapes[n]) for n in ("G", "D"))
    g1, d1 = (shapes[n][0][0] * shapes[n][0][1] for n in ("G", "D"))
    return 2 * (4 * pg - g1 + 9 * pd - 2 * d1)
