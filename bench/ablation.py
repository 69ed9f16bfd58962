"""The ablation: what each of the reference design's techniques does, measured over seeds.

    make ablation                                   # every variant, 3 seeds (hours on 2 cores)
    python bench/ablation.py --quick                # a smoke run: few steps, few samples
    python bench/ablation.py --only a,g,h --seeds 0 1 2 3 --steps 3000
    python bench/ablation.py --reuse                # keep runs that already finished

Each variant trains at the same number of steps and the same per-process batch, once per seed,
through the product's own entry point (``pipeline/train.py``; the 2-process variants under
``accelerate launch`` with gloo), and is scored by the run's final evaluation on
``--samples`` generated images. The anchor (h) is a tutorial-style loop outside the trainer
(``bench.workloads.tutorial_gan``) on the same 4,000 training digits, scored by the same
evaluator. Besides the sample metrics, D itself is probed on real digits: its train/held-out gap
(overfitting) and how much a small input perturbation moves its output (robustness).

Single-process runs use one thread each and run ``--jobs`` at a time; 2-process runs run alone.
Every run logs to wandb (offline without a login) in project ``gan-pipeline-ablation``, one
group per variant. Writes ``docs/ablation.md``, ``docs/ablation.json`` and
``docs/images/ablation-grids.png`` (``--quick``: under ``runs/ablation-quick/``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root must win over bench/ itself
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipeline.io import atomic_write_json, atomic_write_text, seeded_generator

ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "mnist5k.yaml"
PROJECT = "gan-pipeline-ablation"
REFERENCE = ("train.d_weight_penalty=0.01", "train.penalty_include_biases=true")
"""The reference design's L2 penalty: lambda = 0.01 over all of D's parameters."""
REFERENCE_NOISE = ("train.instance_noise_std=0.1", "train.instance_noise_decay_steps=0")
"""...and its instance noise: a constant std of 0.1."""
ALL_OFF = (
    "model.g_batchnorm=false",
    "model.d_dropout=0",
    "train.instance_noise_std=0",
    "train.d_weight_penalty=0",
)
MULTI_STEPS = 1000
EMA_DECAY = 0.995
"""The EMA tried when the default has none (a 139-step half-life: 0.999 lagged the live G at
every horizon up to 6000 steps in single-seed runs, 0.995 did not)."""
LAUNCHER_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "PMI_RANK",
    "PMI_SIZE",
)
"""A launcher's rank variables: a child run that inherited them would try to join that job."""
PROBE_NOISE_STD = 0.1
"""The small perturbation D's robustness is probed with (the std of the reference noise)."""


@dataclass(frozen=True)
class Variant:
    key: str
    title: str
    overrides: tuple[str, ...] = ()
    processes: int = 1
    """2: under accelerate launch with gloo, trained for ``Settings.multi_steps``."""
    batch_size: int | None = None
    """Per-process batch; None keeps the preset's."""
    tutorial: bool = False
    """The plain loop outside the trainer (the anchor)."""
    extra: bool = False
    """Trained only when named in ``--only`` (a follow-up question, not one of issue 9's)."""


VARIANTS = (
    Variant("a", "default"),
    Variant("b", "no BatchNorm in G", ("model.g_batchnorm=false",)),
    Variant("c", "no Dropout in D", ("model.d_dropout=0",)),
    Variant("d", "no instance noise", ("train.instance_noise_std=0",)),
    Variant("e", "no L2 penalty", ("train.d_weight_penalty=0",)),
    Variant("f", "all four off", ALL_OFF),
    Variant(
        "g",
        "reference values, no EMA",
        ("model.d_dropout=0.5", *REFERENCE, *REFERENCE_NOISE, "model.ema_decay=0"),
    ),
    Variant(
        "old",
        "previous defaults (L2 1e-5 without biases, noise annealed to 0)",
        (
            "model.d_dropout=0.5",
            "train.d_weight_penalty=1e-5",
            "train.penalty_include_biases=false",
            "NOISE_ANNEALED_OVER_RUN",
        ),
        extra=True,
    ),
    Variant("p10", "Dropout 0.1 in D", ("model.d_dropout=0.1",)),
    Variant("p25", "Dropout 0.25 in D", ("model.d_dropout=0.25",), extra=True),
    Variant("p50", "Dropout 0.5 in D (the reference)", ("model.d_dropout=0.5",)),
    Variant(
        "p50-dupdate",
        "Dropout 0.5 in D's update only (not in the G phase)",
        ("model.d_dropout=0.5", "train.g_step_dropout=false"),
        extra=True,
    ),
    Variant(
        "h",
        "tutorial loop (reference values)",
        ("model.d_dropout=0.5", *REFERENCE, *REFERENCE_NOISE),
        tutorial=True,
    ),
    Variant("ema", "default, EMA toggled", ("EMA_TOGGLE",)),
    Variant("i8-sync", "2 procs x 8, synchronized BN", processes=2, batch_size=8),
    Variant("i8-local", "2 procs x 8, per-replica BN", ("model.g_batchnorm_sync=false",), 2, 8),
    Variant("i32-sync", "2 procs x 32, synchronized BN", processes=2, batch_size=32),
    Variant("i32-local", "2 procs x 32, per-replica BN", ("model.g_batchnorm_sync=false",), 2, 32),
    Variant(
        "i32-bf16",
        "2 procs x 32, bf16 gradient all-reduce",
        ("train.grad_compression=bf16",),
        2,
        32,
        extra=True,
    ),
)
BY_KEY = {v.key: v for v in VARIANTS}

# (metric, better, label); the tables show each as mean ± std over seeds.
METRICS = (
    ("fid", "lower", "FID"),
    ("kid", "lower", "KID"),
    ("precision", "higher", "precision"),
    ("recall", "higher", "recall"),
    ("classes_covered", "higher", "classes"),
    ("class_kl", "lower", "class KL"),
    ("d_gap", "lower", "D gap"),
    ("d_sensitivity", "lower", "D sensitivity"),
    ("g_loss_std", "lower", "G loss std"),
    ("train_s", "lower", "train s"),
)


@dataclass(frozen=True)
class Claim:
    text: str
    on: str
    off: str
    metric: str
    measured_by: str


CLAIMS = (
    Claim(
        "BatchNorm in G reduces mode collapse",
        "a",
        "b",
        "class_kl",
        "class KL of the samples' predicted-class histogram from the real one (also classes "
        "covered and recall)",
    ),
    Claim(
        "BatchNorm in G steadies training",
        "a",
        "b",
        "g_loss_std",
        "std of the logged G loss over the second half of training",
    ),
    Claim(
        "Dropout in D improves its generalization",
        "a",
        "c",
        "d_gap",
        "D gap: mean D(x) on the 4,000 training digits minus on the 1,000 held-out ones",
    ),
    Claim(
        "Instance noise makes D robust to small perturbations",
        "a",
        "d",
        "d_sensitivity",
        f"D sensitivity: mean |D(x + {PROBE_NOISE_STD} n) - D(x)| on held-out digits",
    ),
    Claim("The L2 penalty on D prevents overfitting", "a", "e", "d_gap", "D gap (as above)"),
    Claim(
        "The reference values beat the previous defaults",
        "g",
        "old",
        "fid",
        "FID (both with Dropout 0.5 and no EMA; they differ in the L2 penalty and the noise)",
    ),
    Claim(
        "The BatchNorm-aware EMA generator beats the live one",
        "ema",
        "a",
        "fid",
        f"FID of the EMA generator ({EMA_DECAY}, BN statistics recomputed) against the live G",
    ),
    Claim(
        "float32 gradient all-reduces beat bf16-compressed ones (2 x 32)",
        "i32-sync",
        "i32-bf16",
        "fid",
        "FID with float32 against bf16 gradient all-reduces",
    ),
    Claim(
        "Synchronized BN beats per-replica BN at 8 images per replica",
        "i8-sync",
        "i8-local",
        "fid",
        "FID at the same global batch (2 x 8)",
    ),
    Claim(
        "Synchronized BN beats per-replica BN at 32 images per replica",
        "i32-sync",
        "i32-local",
        "fid",
        "FID at the same global batch (2 x 32)",
    ),
)


@dataclass
class Settings:
    steps: int
    """Steps of every single-process run."""
    multi_steps: int
    """Steps of the 2-process runs, which compare only with each other (each uses both cores,
    so they run one at a time: fewer steps keep `make ablation` to hours)."""
    seeds: list[int]
    samples: int
    jobs: int
    trackers: str
    out_dir: Path
    runs_dir: Path
    reuse: bool
    ema_on_by_default: bool = False
    notes: list[str] = field(default_factory=list)


# --- one run ------------------------------------------------------------------------------------


def run_dir(s: Settings, variant: Variant, seed: int) -> Path:
    return s.runs_dir / variant.key / f"seed-{seed}"


def _trainer_overrides(s: Settings, variant: Variant, seed: int) -> list[str]:
    overrides = []
    for item in variant.overrides:
        if item == "EMA_TOGGLE":  # the default with its EMA switched the other way
            overrides.append(f"model.ema_decay={0 if s.ema_on_by_default else EMA_DECAY}")
        elif item == "NOISE_ANNEALED_OVER_RUN":
            overrides.append(f"train.instance_noise_decay_steps={s.steps}")
        else:
            overrides.append(item)
    if variant.batch_size is not None:
        overrides.append(f"train.batch_size={variant.batch_size}")
    return [
        f"output_dir={run_dir(s, variant, seed)}",
        f"seed={seed}",
        f"train.steps={s.steps if variant.processes == 1 else s.multi_steps}",
        "train.cpu_threads=1",
        "resume=none",
        "overwrite=true",
        "checkpoint.every=0",
        "sample.every=0",
        "eval.every=0",
        f"eval.n_samples={s.samples}",
        f"log.every={max(1, min(50, s.steps // 20))}",
        f"log.trackers=[{s.trackers}]",
        f"log.project={PROJECT}",
        f"log.group={variant.key}",
        f"log.run_name={variant.key}-seed{seed}",
        *overrides,
    ]


def _command(s: Settings, variant: Variant, seed: int) -> list[str]:
    if variant.tutorial:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "--tutorial-run",
            str(run_dir(s, variant, seed)),
            "--seeds",
            str(seed),
            "--steps",
            str(s.steps),
            "--samples",
            str(s.samples),
            "--trackers",
            s.trackers,
        ]
    train = str(ROOT / "pipeline" / "train.py")
    args = ["--config", str(PRESET), *_trainer_overrides(s, variant, seed)]
    if variant.processes == 1:
        return [sys.executable, train, *args]
    from accelerate.utils.other import get_free_port

    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    launch += ["--config_file", str(ROOT / "launch" / "cpu_2proc.yaml")]
    launch += ["--num_processes", str(variant.processes), "--main_process_port"]
    return [*launch, str(get_free_port()), train, *args]


def _training_values(cfg) -> dict:
    """A resolved config as a dict, without its paths and tracker names: what decides the
    training itself."""
    from pipeline.config import to_dict

    values = to_dict(cfg)
    values.pop("output_dir")
    values.pop("log")
    return values


def _training_config(s: Settings, variant: Variant, seed: int = 0) -> dict | None:
    """The training values of a trainer variant's run (None for the tutorial loop)."""
    from pipeline.config import load_config

    if variant.tutorial:
        return None
    cfg = load_config(PRESET, _trainer_overrides(s, variant, seed))
    return {**_training_values(cfg), "processes": variant.processes}


def _tutorial_config(seed: int):
    """The resolved config the tutorial loop (h) takes its values from."""
    from pipeline.config import load_config

    return load_config(PRESET, [f"seed={seed}", *BY_KEY["h"].overrides])


def same_config(s: Settings, key: str, other: str) -> bool:
    """Whether two trainer variants train the very same run (paths and tracker names aside)."""
    a = _training_config(s, BY_KEY[key])
    return a is not None and a == _training_config(s, BY_KEY[other])


def _reusable(s: Settings, variant: Variant, seed: int, out: Path, row: dict) -> bool:
    """Whether a finished run in ``out`` is the run asked for now: the same steps and samples
    and the same resolved config (a changed default retrains it)."""
    from pipeline.config import load_config

    steps = s.steps if variant.processes == 1 else s.multi_steps
    done = json.loads((out / "summary.json").read_text())["steps"]
    if done != steps or row.get("n_samples") != s.samples:
        return False
    if variant.tutorial:
        stored_file = out / "tutorial-config.json"
        wanted = _training_values(_tutorial_config(seed))
        return stored_file.exists() and json.loads(stored_file.read_text()) == wanted
    stored = _training_values(load_config(out / "config.yaml"))
    return {**stored, "processes": variant.processes} == _training_config(s, variant, seed)


def train_one(s: Settings, variant: Variant, seed: int) -> dict:
    """Train (or reuse) one run and measure it; returns its result row."""
    out = run_dir(s, variant, seed)
    result_file = out / "ablation-result.json"
    if s.reuse and result_file.exists():
        row = json.loads(result_file.read_text())
        if _reusable(s, variant, seed, out, row):
            return {**row, "variant": variant.key}
    out.parent.mkdir(parents=True, exist_ok=True)
    # Started inside a launcher (torchrun, srun), each child must still be its own job.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    if variant.processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    started = time.perf_counter()
    log_path = s.runs_dir / f"{variant.key}-seed{seed}.log"
    with open(log_path, "w") as log:
        code = subprocess.call(
            _command(s, variant, seed), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if code != 0:
        raise RuntimeError(f"run {variant.key} seed {seed} failed (status {code}); see {log_path}")
    summary = json.loads((out / "summary.json").read_text())
    row = {
        "variant": variant.key,
        "seed": seed,
        "wall_s": time.perf_counter() - started,
        "train_s": summary["wall_time_s"],
        **{
            k.removeprefix("eval/"): v
            for k, v in summary["final_metrics"].items()
            if k.startswith("eval/")
        },
    }
    if not variant.tutorial:
        row.update(probe_discriminator(out))
        row["g_loss_std"] = g_loss_std(out / "metrics.jsonl")
    else:
        row.update(json.loads((out / "tutorial-probe.json").read_text()))
    atomic_write_json(result_file, row)
    return row


def g_loss_std(metrics_path: Path) -> float:
    """Std of the logged (interval-mean) G loss over the second half of the run."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    losses = [r["train/g_loss"] for r in rows if "train/g_loss" in r]
    half = losses[len(losses) // 2 :]
    return statistics.stdev(half) if len(half) >= 2 else math.nan


@torch.no_grad()
def d_probe(d_prob, data_cfg) -> dict[str, float]:
    """D on real digits, in eval mode: its train/held-out gap and its sensitivity to noise."""
    from pipeline.data import load_dataset

    train = load_dataset(data_cfg, "train").images
    held = load_dataset(data_cfg, "heldout").images
    noise = torch.randn(held.shape, generator=seeded_generator(0, "ablation-d-probe"))
    on_train, on_held = d_prob(train), d_prob(held)
    return {
        "d_train": float(on_train.mean()),
        "d_heldout": float(on_held.mean()),
        "d_gap": float(on_train.mean() - on_held.mean()),
        "d_sensitivity": float((d_prob(held + PROBE_NOISE_STD * noise) - on_held).abs().mean()),
    }


def probe_discriminator(run: Path) -> dict[str, float]:
    """``d_probe`` of the trainer's D from the run's final checkpoint."""
    from pipeline.checkpoint import resolve_checkpoint, split_prefixed
    from pipeline.config import from_dict
    from pipeline.models import Discriminator

    ckpt = resolve_checkpoint(run)
    cfg = from_dict(ckpt.manifest["config"])
    D = Discriminator(cfg.model)
    D.load_state_dict(split_prefixed(ckpt.tensors("model.safetensors"), "D"))
    D.eval()
    return d_probe(lambda x: torch.sigmoid(D(x)), cfg.data)


def tutorial_run(out: Path, seed: int, steps: int, samples: int, trackers: str) -> None:
    """The anchor (h): ``bench.workloads.tutorial_gan`` with the reference values for ``steps``
    steps on the mnist5k training digits; scored, probed and logged like a trainer run."""
    from bench.workloads import tutorial_gan
    from pipeline.cli.evaluate import generate_samples
    from pipeline.data import load_dataset
    from pipeline.evaluation import Evaluator
    from pipeline.samples import fixed_latents, render, save_grid

    torch.set_num_threads(1)
    cfg = _tutorial_config(seed)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "tutorial-config.json", _training_values(cfg))  # for --reuse
    images = load_dataset(cfg.data, "train").images
    started = time.perf_counter()
    step, G, D = tutorial_gan(cfg, torch.device("cpu"), images)
    G.train()
    D.train()
    for _ in range(steps):
        step()
    train_s = time.perf_counter() - started
    G.eval()
    D.eval()
    save_grid(
        render(G, fixed_latents(seed, cfg.sample.n, cfg.model.latent_dim)),
        out / "samples" / f"step-{steps:08d}.png",
    )
    evaluator = Evaluator.for_dataset(cfg.data)
    scores = evaluator.score(generate_samples(G, cfg.model.latent_dim, samples, seed, "cpu"))
    atomic_write_json(out / "tutorial-probe.json", d_probe(lambda x: D(x).squeeze(1), cfg.data))
    final = {f"eval/{k}": v for k, v in scores.items()}
    atomic_write_json(
        out / "summary.json", {"steps": steps, "wall_time_s": train_s, "final_metrics": final}
    )
    if trackers == "wandb":
        import wandb

        from pipeline.tracking import wandb_mode

        run = wandb.init(
            project=PROJECT,
            group="h",
            name=f"h-seed{seed}",
            dir=str(out),
            mode=wandb_mode(),
            config={"variant": "h", "seed": seed, "steps": steps},
        )
        run.log({**final, "perf/train_s": train_s}, step=steps)
        run.finish()


# --- aggregation, verdicts, the report ---------------------------------------------------------


def aggregate(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per variant: each metric's (mean, sample std, n) over the seeds where it is finite."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == key]
        out[key] = {}
        for metric, _, _ in METRICS:
            values = [float(r[metric]) for r in mine if metric in r]
            values = [v for v in values if math.isfinite(v)]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            out[key][metric] = [mean, std, len(values)]
    return out


def verdict(on: list[float], off: list[float], better: str) -> tuple[str, float, float]:
    """(verdict, difference, two standard errors): the technique is confirmed when switching it
    off worsens the metric by more than two standard errors of the difference of the means,
    refuted when it improves it by more, and not distinguishable otherwise."""
    (m_on, s_on, n_on), (m_off, s_off, n_off) = on, off
    diff = m_off - m_on if better == "lower" else m_on - m_off  # > 0: the technique helps
    if min(n_on, n_off) < 2 or not math.isfinite(diff):  # no spread to compare with
        return "not measured", diff, math.nan
    two_se = 2 * math.sqrt(s_on**2 / n_on + s_off**2 / n_off)
    if abs(diff) <= two_se:
        return "not distinguishable", diff, two_se
    return ("confirmed" if diff > 0 else "refuted"), diff, two_se


def _fmt(cell: list[float], metric: str) -> str:
    mean, std, _ = cell
    if math.isnan(mean):
        return "-"
    digits = {"kid": 1, "fid": 1, "classes_covered": 1, "train_s": 0}.get(metric, 3)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def report(s: Settings, rows: list[dict], wall_s: float) -> tuple[str, list[dict]]:
    agg = aggregate(rows)
    better = {m: b for m, b, _ in METRICS}
    lines = [
        "# Ablation: the reference design's claims, measured",
        "",
        f"Generated by `{' '.join(['python bench/ablation.py', *sys.argv[1:]]) or 'make ablation'}` "
        f"on {datetime.date.today().isoformat()} ({platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}); {len({(r['variant'], r['seed']) for r in rows if 'same_as' not in r})} runs "
        f"taking {sum(r['wall_s'] for r in rows if 'same_as' not in r) / 60:.0f} min of run time "
        f"({s.jobs} single-process runs at a time), this invocation {wall_s / 60:.0f} min "
        "(it reuses finished runs of the same config with --reuse). "
        f"Every single-process variant trains {s.steps} steps at the preset's batch, the "
        f"2-process ones {s.multi_steps} steps at the per-process batch named, on the 4,000 "
        "mnist5k training digits, seeds "
        f"{', '.join(map(str, s.seeds))}; each run is scored on {s.samples} generated images by "
        "the evaluator (classifier FID, KID, precision/recall, classes covered, class KL). "
        "Cells are mean ± std over seeds. Do not edit by hand: rerun `make ablation`.",
        "",
        *s.notes,
        "",
        "## Variants",
        "",
        "| variant | " + " | ".join(label for _, _, label in METRICS) + " |",
        "|---|" + "---:|" * len(METRICS),
    ]
    for key, cells in agg.items():
        title = f"({key}) {BY_KEY[key].title}" if key in BY_KEY else key
        if key == "ema":
            title = f"(ema) default, EMA {'off' if s.ema_on_by_default else f'on ({EMA_DECAY})'}"
        lines.append(f"| {title} | " + " | ".join(_fmt(cells[m], m) for m, _, _ in METRICS) + " |")
    lines += [
        "",
        "D gap: mean D(x) (a probability, D in eval mode) on the training digits minus on the "
        f"held-out digits; D sensitivity: mean |D(x + {PROBE_NOISE_STD} n) - D(x)| on held-out "
        "digits, n standard normal; G loss std: over the logged G loss of the run's second half; "
        "train s: the training loop's wall time (single-process runs ran "
        f"{s.jobs} at a time, one thread each).",
        "",
        "## Verdicts",
        "",
        "A claim is *confirmed* when switching the technique off worsens its metric by more than "
        "two standard errors of the difference of the means, *refuted* when it improves it by "
        "more, and *not distinguishable* otherwise. The test is unpaired (the seeds are shared "
        "but their runs are not matched), about 88 % two-sided confidence at 3 seeds each "
        "(Student's t), with no correction for the number of claims: a single confirmation or "
        "refutation near the threshold is a hint, not a finding.",
        "",
        "| claim | measured by | on | off | verdict | FID on / off |",
        "|---|---|---:|---:|---|---:|",
    ]
    verdicts = []
    for c in CLAIMS:
        if c.on not in agg or c.off not in agg:
            continue
        if s.ema_on_by_default and "ema" in (c.on, c.off):  # then (ema) is the EMA-off run
            c = Claim(c.text, c.off, c.on, c.metric, c.measured_by)
        v, diff, two_se = verdict(agg[c.on][c.metric], agg[c.off][c.metric], better[c.metric])
        verdicts.append({"claim": c.text, "verdict": v, "difference": diff, "two_se": two_se})
        lines.append(
            f"| {c.text} | {c.measured_by} | ({c.on}) {_fmt(agg[c.on][c.metric], c.metric)} | "
            f"({c.off}) {_fmt(agg[c.off][c.metric], c.metric)} | **{v}** | "
            f"{_fmt(agg[c.on]['fid'], 'fid')} / {_fmt(agg[c.off]['fid'], 'fid')} |"
        )
    lines += ["", "## Targets", ""]
    lines += targets(s, rows, agg)
    lines += [
        "",
        "## Samples (seed " + str(s.seeds[0]) + ")",
        "",
        "![samples](images/ablation-grids.png)"
        if s.out_dir.name == "docs"
        else "![samples](ablation-grids.png)",
    ]
    return "\n".join(lines) + "\n", verdicts


def targets(s: Settings, rows: list[dict], agg: dict) -> list[str]:
    if "a" not in agg:
        return ["(the default was not run)"]
    a = [r for r in rows if r["variant"] == "a"]
    out = []
    if "h" in agg:
        ok = agg["a"]["fid"][0] < agg["h"]["fid"][0]
        out.append(
            f"- the default beats the tutorial loop (h) on FID: {_fmt(agg['a']['fid'], 'fid')} vs "
            f"{_fmt(agg['h']['fid'], 'fid')}: **{'PASS' if ok else 'MISS'}**"
        )
    classes = [int(r["classes_covered"]) for r in a]
    out.append(
        f"- 10/10 classes on every seed: {classes}: **{'PASS' if min(classes) == 10 else 'MISS'}**"
    )
    kl = agg["a"]["class_kl"][0]
    out.append(f"- class KL < 0.05 (mean): {kl:.3f}: **{'PASS' if kl < 0.05 else 'MISS'}**")
    fid, recall = agg["a"]["fid"][0], agg["a"]["recall"][0]
    out.append(
        f"- make train's target, FID <= 45 with recall >= 0.5 (means, at these steps): "
        f"{_fmt(agg['a']['fid'], 'fid')}, recall {_fmt(agg['a']['recall'], 'recall')}: "
        f"**{'PASS' if fid <= 45 and recall >= 0.5 else 'MISS'}**"
    )
    if "ema" in agg:
        ema, live = ("a", "ema") if s.ema_on_by_default else ("ema", "a")
        v, diff, two_se = verdict(agg[ema]["fid"], agg[live]["fid"], "lower")
        # No worse: better, or within two standard errors; no verdict without two seeds each.
        status = {"not measured": "NOT MEASURED", "refuted": "MISS"}.get(v, "PASS")
        out.append(
            f"- the BatchNorm-aware EMA is no worse than the live G on FID: ({ema}) "
            f"{_fmt(agg[ema]['fid'], 'fid')} vs ({live}) {_fmt(agg[live]['fid'], 'fid')} "
            f"(EMA better by {diff:.1f}, two standard errors {two_se:.1f}): **{status}**"
        )
    return out


def sample_figure(s: Settings, keys: list[str], aliases: dict[str, str], path: Path) -> None:
    """One figure: the final sample grid of each variant's first seed (an alias's grid is its
    target's, shown once)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    grids = []
    for key in (k for k in keys if k not in aliases):
        found = sorted((run_dir(s, BY_KEY[key], s.seeds[0]) / "samples").glob("step-*.png"))
        if found:
            grids.append((key, mpimg.imread(found[-1])))
    cols = min(5, len(grids))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (key, image) in zip(axes.flat, grids):
        ax.imshow(image)
        ax.set_title(f"({key}) {BY_KEY[key].title}", fontsize=8)
    fig.tight_layout()

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    from pipeline.io import atomic_write

    atomic_write(path, write)
    plt.close(fig)


# --- orchestration ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated variant keys (default: all but old, p25, p50-dupdate, i32-bf16)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps per run (default: the preset's, make train's)",
    )
    p.add_argument(
        "--samples", type=int, default=None, help="generated images scored per run (default 5000)"
    )
    p.add_argument(
        "--multi-steps",
        type=int,
        default=None,
        help=f"steps of the 2-process runs (default: the smaller of --steps and {MULTI_STEPS})",
    )
    p.add_argument("--jobs", type=int, default=2, help="single-process runs at a time")
    p.add_argument("--trackers", choices=("wandb", "none"), default="wandb")
    p.add_argument("--quick", action="store_true", help="a smoke run: 30 steps, 500 samples")
    p.add_argument("--reuse", action="store_true", help="keep runs that already finished")
    p.add_argument("--out-dir", type=Path, default=None, help="where the report goes")
    p.add_argument("--runs-dir", type=Path, default=None, help="where the runs go")
    p.add_argument("--tutorial-run", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tutorial_run is not None:
        tutorial_run(args.tutorial_run, args.seeds[0], args.steps, args.samples, args.trackers)
        return 0
    if min(args.seeds) < 0 or (args.steps is not None and args.steps < 1):
        print("error: --seeds must be >= 0 and --steps >= 1", file=sys.stderr)
        return 2
    from pipeline.config import load_config

    keys = [k for k in args.only.split(",") if k] or [v.key for v in VARIANTS if not v.extra]
    unknown = [k for k in keys if k not in BY_KEY]
    if unknown:
        print(f"error: unknown variant {unknown[0]!r}; known: {', '.join(BY_KEY)}", file=sys.stderr)
        return 2
    steps, samples = (30, 500) if args.quick else (load_config(PRESET).train.steps, 5000)
    runs_dir = args.runs_dir or ROOT / ("runs/ablation-quick" if args.quick else "runs/ablation")
    s = Settings(
        steps=args.steps or steps,
        multi_steps=args.multi_steps or min(args.steps or steps, MULTI_STEPS),
        seeds=args.seeds,
        samples=args.samples or samples,
        jobs=args.jobs,
        trackers=args.trackers,
        out_dir=args.out_dir or (runs_dir if args.quick else ROOT / "docs"),
        runs_dir=runs_dir,
        reuse=args.reuse,
        ema_on_by_default=load_config(PRESET).model.ema_decay > 0,
    )
    # A variant whose config an earlier one trains (p10 is the default, p50 the reference
    # values) is not trained twice: its rows are that variant's.
    aliases: dict[str, str] = {}
    for i, key in enumerate(keys):
        same = [k for k in keys[:i] if k not in aliases and same_config(s, key, k)]
        if same:
            aliases[key] = same[0]
    keys_run = [k for k in keys if k not in aliases]
    started = time.perf_counter()
    single = [(BY_KEY[k], seed) for k in keys_run for seed in s.seeds if BY_KEY[k].processes == 1]
    multi = [(BY_KEY[k], seed) for k in keys_run for seed in s.seeds if BY_KEY[k].processes > 1]

    def one(job) -> dict:
        variant, seed = job
        row = train_one(s, variant, seed)
        print(
            f"ablation: ({variant.key}) seed {seed}: FID {row['fid']:.1f}, {row['train_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        return row

    with ThreadPoolExecutor(max(1, s.jobs)) as pool:
        rows = list(pool.map(one, single))
    rows += [one(job) for job in multi]  # each uses every core: one at a time
    for alias, target in aliases.items():
        rows += [{**r, "variant": alias, "same_as": target} for r in rows if r["variant"] == target]
        s.notes.append(
            f"({alias}) {BY_KEY[alias].title} resolves to the same config as ({target}), so "
            f"its rows are ({target})'s runs."
        )
    order = {k: i for i, k in enumerate(keys)}
    rows.sort(key=lambda r: (order[r["variant"]], r["seed"]))
    wall = time.perf_counter() - started
    text, verdicts = report(s, rows, wall)
    images = s.out_dir / "images" if s.out_dir.name == "docs" else s.out_dir
    sample_figure(s, keys, aliases, images / "ablation-grids.png")
    atomic_write_text(s.out_dir / "ablation.md", text)
    atomic_write_json(
        s.out_dir / "ablation.json",
        {
            "steps": s.steps,
            "seeds": s.seeds,
            "samples": s.samples,
            "wall_s": wall,
            "runs": rows,
            "aggregate": aggregate(rows),
            "verdicts": verdicts,
        },
        indent=1,
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
