"""The things the benchmark times, each built as a zero-argument step function.

trainer_step  the project's own loop body: ``TrainLoop.step_all_ranks`` (pipeline/loop.py), the
              one definition of a training iteration that ``Trainer.fit`` calls too, on a state
              built by ``build_gan`` (SyncBN where distributed, DDP, Adam). Nothing of the
              iteration is retyped here, so the bench measures the product's code.
plain_step    the same GAN written the way a hand-written tutorial does (see ``plain_step``).
ddp_peer_step the weak-scaling peer: that tutorial loop under plain DDP, BatchNorm unsynchronized,
              a DistributedSampler loader (see ``ddp_peer_step``).
limit_step    only the matmuls of one trainer step (``flops.trainer_step_matmuls``), as
              ``torch.mm``/``torch.addmm`` with ``out=`` on preallocated tensors.

``bench_config`` is the run configuration all of them are built from.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from bench.flops import Matmul, trainer_step_matmuls
from pipeline.build import build_gan
from pipeline.config import RunConfig, load_config
from pipeline.data import ShardedBatches
from pipeline.distributed import seed_rank_streams
from pipeline.loop import TrainLoop
from pipeline.models import linear_shapes

Step = Callable[[], object]
DATASET_SIZE = 10_240  # synthetic images; 80% (8192) train: one batch of 4096 on up to 2 ranks
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_config(
    batch: int,
    precision: str = "no",
    compile: bool = False,
    threads: int = 0,
    width: int = 1,
    compile_mode: str = "default",
) -> RunConfig:
    """The project's defaults (Dropout 0.1, instance noise, L2 penalty on) at per-process batch
    ``batch`` and every hidden width times ``width``; no trackers, no eval, synthetic data (the
    pixel values do not change the cost of an MLP step)."""
    base = load_config(None)
    g = [w * width for w in base.model.g_hidden]
    d = [w * width for w in base.model.d_hidden]
    overrides = [
        f"train.batch_size={batch}",
        "log.trackers=[none]",
        "eval.enabled=false",
        "data.name=synthetic",
        f"data.synthetic_size={DATASET_SIZE}",
        f"model.g_hidden=[{','.join(map(str, g))}]",
        f"model.d_hidden=[{','.join(map(str, d))}]",
        # quoted: YAML reads a bare `no` as the boolean false
        f"train.mixed_precision='{precision}'",
        f"train.compile={str(compile).lower()}",
        f"train.compile_mode={compile_mode}",
        f"train.cpu_threads={threads}",
    ]
    return load_config(None, overrides)


def trainer_step(cfg: RunConfig, accelerator, images: torch.Tensor) -> tuple[Step, str]:
    """Collective when distributed (each call is one ``step_all_ranks``): one iteration of the
    trainer's loop, without the logging, samples and checkpoints around it; and the BatchNorm
    synchronization in use. Built as ``Trainer`` builds it: ``build_gan``, the rank's streams
    seeded, ``ShardedBatches`` over the on-device ``images``."""
    state, ema, bn_sync = build_gan(cfg, accelerator)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    seed_rank_streams(cfg.seed, rank)
    batches = ShardedBatches(len(images), cfg.train.batch_size, rank, world, cfg.seed, device)
    loop = TrainLoop(cfg, accelerator, state, ema, images, batches)
    count = itertools.count()

    def step() -> None:
        loop.step_all_ranks(next(count))

    step.loop = loop  # for measurements that look inside (bench/profile_worker.py)
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
    return tutorial_gan(cfg, device, images)[0]


def tutorial_gan(
    cfg: RunConfig, device: torch.device, images: torch.Tensor
) -> tuple[Step, nn.Module, nn.Module]:
    """``plain_step`` with its G and D (D ends in a Sigmoid), for a run that samples G afterwards
    (``make ablation``'s anchor)."""
    torch.manual_seed(cfg.seed)
    G, D = (net.to(device) for net in _tutorial_models(cfg))
    loader = DataLoader(
        TensorDataset(images.cpu()), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True
    )

    def forever() -> Iterator[torch.Tensor]:
        while True:  # for epoch in range(epochs): for (real,) in loader: ...
            for (real,) in loader:
                yield real

    return _tutorial_step(cfg, G, D, forever(), device), G, D


def ddp_peer_step(
    cfg: RunConfig, device: torch.device, images: torch.Tensor
) -> tuple[Step, nn.Module, nn.Module]:
    """Collective when distributed (DDP all-reduces gradients and broadcasts G's BatchNorm
    buffers in every forward): ``plain_step`` as a plain-DDP user writes it, the weak-scaling
    peer of the trainer. Returns the step and the (wrapped) G and D.

    - G and D from the same tutorial builder, plain ``nn.BatchNorm1d`` (*not* synchronized: each
      rank normalizes with its own batch's statistics), built under one seed on every rank and,
      with several processes, each wrapped in ``DistributedDataParallel`` with its defaults
      (buffers broadcast from rank 0 at each forward); on one process they stay unwrapped, like
      the trainer's (``accelerator.prepare`` wraps only across processes) and Lightning's on one
      device;
    - ``find_unused_parameters=False`` (the default): with G and D wrapped separately every
      backward that runs through a wrapped module reaches all of its parameters (D is not frozen
      in the G step; G's D-step output is detached and never backpropagated, which starts no
      reduction), so ``True``'s graph search after every forward (needed by Lightning's one DDP
      over both networks) would only cost time;
    - a ``DataLoader`` over ``DistributedSampler(shuffle=True, drop_last=True)``, ``set_epoch``
      at each epoch; each rank's z and noise from its own stream (``seed_rank_streams``);
    - the step of ``plain_step``, unchanged.
    """
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(cfg.seed)
    G, D = (net.to(device) for net in _tutorial_models(cfg))
    if world > 1:
        G, D = DistributedDataParallel(G), DistributedDataParallel(D)
    seed_rank_streams(cfg.seed, rank)
    dataset = TensorDataset(images.cpu())
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True)

    def forever() -> Iterator[torch.Tensor]:
        for epoch in itertools.count():
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            for (real,) in loader:
                yield real

    return _tutorial_step(cfg, G, D, forever(), device), G, D


def _tutorial_step(
    cfg: RunConfig,
    G: nn.Module,
    D: nn.Module,
    batches: Iterator[torch.Tensor],
    device: torch.device,
) -> Step:
    """The tutorial's step, shared by ``plain_step`` and ``ddp_peer_step``; the optimizers are
    built here, on the (possibly DDP-wrapped) modules' parameters."""
    t = cfg.train
    opt_G = torch.optim.Adam(G.parameters(), lr=t.g_lr, betas=tuple(t.betas))
    opt_D = torch.optim.Adam(D.parameters(), lr=t.d_lr, betas=tuple(t.betas))
    criterion = nn.BCELoss()
    use_autocast = t.mixed_precision != "no"
    dtype = torch.bfloat16 if t.mixed_precision == "bf16" else torch.float16

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


def limit_step_for(cfg: RunConfig, device: torch.device) -> Step:
    """``limit_step`` for the trainer step of ``cfg``: its matmuls at its batch, in the dtype of
    ``train.mixed_precision``, with a bias wherever the model's Linear has one."""
    m = cfg.model
    shapes = linear_shapes(m)
    has_bias = {
        "G": [not m.g_batchnorm] * len(m.g_hidden) + [True],
        "D": [True] * (len(m.d_hidden) + 1),
    }
    matmuls = trainer_step_matmuls(shapes, cfg.train.batch_size)
    return limit_step(
        matmuls, shapes, has_bias, device, PRECISION_DTYPES[cfg.train.mixed_precision]
    )
