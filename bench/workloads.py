"""The three things the benchmark times, each built as a zero-argument step function.

trainer_step  the project's code path: ``build_gan`` (SyncBN where distributed, DDP, Adam),
              a batch indexed from the on-device image tensor by ``ShardedBatches``, a z draw,
              ``train_step`` (D phase + G phase with dropout, instance noise and the L2 penalty),
              and the rest of ``Trainer.fit``'s per-step work (statistics accumulated on the
              device; the stop-signal agreement, an all-reduce, when distributed). No logging,
              samples or checkpoints.
plain_step    the same GAN written the way a hand-written tutorial does (see ``plain_step``).
limit_step    only the matmuls of one trainer step (``flops.trainer_step_matmuls``), as
              ``torch.mm``/``torch.addmm`` with ``out=`` on preallocated tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.flops import Matmul
from pipeline.config import RunConfig
from pipeline.data import ShardedBatches
from pipeline.distributed import all_reduce_max, seed_rank_streams
from pipeline.step import STAT_NAMES, train_step
from pipeline.trainer import build_gan

Step = Callable[[], object]


def trainer_step(cfg: RunConfig, accelerator, images: torch.Tensor) -> tuple[Step, str]:
    """One iteration of ``Trainer.fit`` without its logging, samples and checkpoints; and the
    BatchNorm synchronization in use."""
    state, ema, bn_sync = build_gan(cfg, accelerator)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    seed_rank_streams(cfg.seed, rank)
    batches = ShardedBatches(len(images), cfg.train.batch_size, rank, world, cfg.seed, device)
    stats_sum = torch.zeros(len(STAT_NAMES), device=device)
    no_stop = torch.zeros(1, device=device)
    count = 0

    def step() -> None:
        nonlocal count
        real = images[batches.next_indices()]
        z = torch.randn(real.shape[0], cfg.model.latent_dim, device=device)
        stats = train_step(state, accelerator, cfg.train, real, z, count)
        count += 1
        if ema is not None:
            ema.update(state.G)
        stats_sum.add_(torch.nan_to_num(stats, nan=0.0, posinf=0.0, neginf=0.0))
        if world > 1:  # Trainer._stop_agreed: every rank learns whether any rank got a signal
            bool(all_reduce_max(no_stop.clone()).item())

    return step, bn_sync


def _tutorial_models(cfg: RunConfig) -> tuple[nn.Module, nn.Module]:
    m = cfg.model
    g_layers: list[nn.Module] = []
    width = m.latent_dim
    for hidden in m.g_hidden:
        g_layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU()]
        width = hidden
    G = nn.Sequential(*g_layers, nn.Linear(width, m.image_size), nn.Tanh())
    d_layers: list[nn.Module] = []
    width = m.image_size
    for hidden in m.d_hidden:
        d_layers += [nn.Linear(width, hidden), nn.LeakyReLU(m.leaky_slope), nn.Dropout(m.d_dropout)]
        width = hidden
    D = nn.Sequential(*d_layers, nn.Linear(width, 1), nn.Sigmoid())
    return G, D


def plain_step(cfg: RunConfig, device: torch.device, images: torch.Tensor) -> Step:
    """A tutorial-style loop: DataLoader(TensorDataset, shuffle=True, drop_last=True) on the host,
    Linear (with bias) + BatchNorm1d + ReLU in G, Sigmoid + BCELoss at D's output, two Adam
    optimizers with the default constructor (same lr and betas), ``zero_grad()``. D step on
    D(real) and D(G(z).detach()), plus the L2 penalty as a Python sum of norms; G step with a fresh
    z and a fresh G(z) through an unfrozen D. Instance noise as ``x + std * randn_like(x)``.
    Under bf16/fp16 the forward passes run in ``torch.autocast`` and BCELoss gets float32.
    """
    t = cfg.train
    torch.manual_seed(cfg.seed)
    G, D = (net.to(device) for net in _tutorial_models(cfg))
    opt_G = torch.optim.Adam(G.parameters(), lr=t.g_lr, betas=tuple(t.betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=t.d_lr, betas=tuple(t.betas))
    criterion = nn.BCELoss()
    loader = DataLoader(
        TensorDataset(images.cpu()), batch_size=t.batch_size, shuffle=True, drop_last=True
    )
    use_autocast = t.mixed_precision != "no"
    dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16

    def forever() -> Iterator[torch.Tensor]:
        while True:  # for epoch in range(epochs): for (real,) in loader: ...
            for (real,) in loader:
                yield real

    batches = forever()

    def step() -> None:
        real = next(batches).to(device)
        b = real.size(0)
        ones = torch.ones(b, 1, device=device)
        zeros = torch.zeros(b, 1, device=device)
        std = t.instance_noise_std

        opt_D.zero_grad()
        z = torch.randn(b, cfg.model.latent_dim, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            fake = G(z)
            d_real = D(real + std * torch.randn_like(real))
            d_fake = D(fake.detach() + std * torch.randn_like(fake))
        d_loss = criterion(d_real.float(), ones) + criterion(d_fake.float(), zeros)
        d_loss = d_loss + t.d_weight_penalty * sum(p.norm() ** 2 for p in D.parameters())
        d_loss.backward()
        opt_D.step()

        opt_G.zero_grad()
        z = torch.randn(b, cfg.model.latent_dim, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=use_autocast):
            fake = G(z)
            d_out = D(fake + std * torch.randn_like(fake))
        g_loss = criterion(d_out.float(), ones)
        g_loss.backward()
        opt_G.step()

    return step


def limit_step(
    matmuls: list[Matmul],
    shapes: dict[str, list[tuple[int, int]]],
    has_bias: dict[str, list[bool]],
    device: torch.device,
    dtype: torch.dtype,
) -> Step:
    """The matmuls of one step, alone, in the layouts autograd uses for ``nn.Linear``:
    forward ``x @ W.T`` (addmm with the bias), wgrad ``gy.T @ x``, dgrad ``gy @ W``.

    A layer's weight is one tensor for all its matmuls, and its input activations of a given row
    count are one tensor for its forward and wgrad, as in the real step.
    """
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    weights = {(n, i): rand(o, fi) for n in shapes for i, (fi, o) in enumerate(shapes[n])}
    biases = {
        (n, i): rand(o) for n in shapes for i, (_, o) in enumerate(shapes[n]) if has_bias[n][i]
    }
    grad_w = {key: torch.empty_like(w) for key, w in weights.items()}
    acts: dict[tuple, torch.Tensor] = {}

    def act(name: str, rows: int, cols: int, key: tuple) -> torch.Tensor:
        full = (name, rows, *key)
        if full not in acts:
            acts[full] = rand(rows, cols)
        return acts[full]

    calls: list[Callable[[], object]] = []
    for mm in matmuls:
        key, rows = (mm.net, mm.layer), mm.rows
        w, x = weights[key], act("x", rows, mm.fan_in, key)
        y, gy = act("y", rows, mm.fan_out, key), act("gy", rows, mm.fan_out, key)
        if mm.kind == "forward":
            if key in biases:
                calls.append(lambda b=biases[key], x=x, w=w, y=y: torch.addmm(b, x, w.t(), out=y))
            else:
                calls.append(lambda x=x, w=w, y=y: torch.mm(x, w.t(), out=y))
        elif mm.kind == "wgrad":
            calls.append(lambda gy=gy, x=x, gw=grad_w[key]: torch.mm(gy.t(), x, out=gw))
        else:
            gx = act("gx", rows, mm.fan_in, key)
            calls.append(lambda gy=gy, w=w, gx=gx: torch.mm(gy, w, out=gx))

    def step() -> None:
        for call in calls:
            call()

    return step
