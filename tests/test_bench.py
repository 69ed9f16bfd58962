"""The benchmark's own arithmetic, specified: the FLOP closed forms equal the sum over the Linear
layers and torch's count of a real step; the trainer step it times is the trainer's loop body;
its weak-scaling peer really is plain DDP with unsynchronized BatchNorm; its one table helper
aligns, its targets pass and miss where they should; and `bench/bench.py --quick` runs end to
end, the scaling section with the peer next to the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.flops import (
    plain_flops_per_image,
    plain_step_matmuls,
    step_flops,
    trainer_flops_per_image,
    trainer_step_matmuls,
)
from bench.report import Column, check_targets, format_table
from pipeline.config import load_config
from pipeline.models import linear_shapes
from tests.dist_utils import run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.latent_dim=4",
    "model.g_hidden=[8,16]",
    "model.d_hidden=[16,8]",
    "log.trackers=[none]",
]
# linear_shapes of TINY: (in, out) of every Linear, input side first.
TINY_G = [(4, 8), (8, 16), (16, 784)]
TINY_D = [(784, 16), (16, 8), (8, 1)]


def _tiny(batch: int = 8):
    return load_config(None, [*TINY, f"train.batch_size={batch}"])


def _mm(fan_in: int, fan_out: int) -> int:
    """FLOPs of one (1 x in) @ (in x out) matmul: one image through one Linear, one direction."""
    return 2 * fan_in * fan_out


def test_linear_shapes_of_the_tiny_config():
    assert linear_shapes(_tiny().model) == {"G": TINY_G, "D": TINY_D}


def test_trainer_flops_per_image_is_the_sum_over_the_linear_layers_of_each_phase():
    G, D = TINY_G, TINY_D
    d_phase = (
        sum(_mm(*s) for s in G)  # G forward on z
        + 2 * sum(_mm(*s) for s in D)  # D forward on cat(real, fake): 2 rows per image
        + 2 * sum(_mm(*s) for s in D)  # D weight gradients, 2 rows
        + 2 * sum(_mm(*s) for s in D[1:])  # D input gradients but the first layer's (data)
    )
    g_phase = (
        sum(_mm(*s) for s in D)  # D forward on the D phase's fake batch
        + sum(_mm(*s) for s in D)  # D input gradients, every layer; frozen: no weight gradients
        + sum(_mm(*s) for s in G)  # G weight gradients
        + sum(_mm(*s) for s in G[1:])  # G input gradients but the first layer's (z)
    )
    shapes = {"G": G, "D": D}
    assert trainer_flops_per_image(shapes) == d_phase + g_phase == 228_864
    for batch in (1, 8, 64):
        assert step_flops(trainer_step_matmuls(shapes, batch)) == batch * 228_864


def test_plain_flops_per_image_adds_a_second_g_forward_and_d_weight_gradients_in_the_g_step():
    G, D = TINY_G, TINY_D
    shapes = {"G": G, "D": D}
    extra = sum(_mm(*s) for s in G) + sum(_mm(*s) for s in D)
    assert plain_flops_per_image(shapes) == trainer_flops_per_image(shapes) + extra == 279_632
    for batch in (1, 8, 64):
        assert step_flops(plain_step_matmuls(shapes, batch)) == batch * 279_632


def test_the_default_model_costs_what_docs_performance_md_says():
    shapes = linear_shapes(load_config(None).model)
    assert trainer_flops_per_image(shapes) == 26_882_048  # "26.88 MFLOP per image"
    assert plain_flops_per_image(shapes) == 32_504_832  # "32.50 MFLOP per image"


def _count_real_steps(rank: int, world: int, batch: int) -> dict:
    """On each rank: torch's FLOP count of one real trainer step and one plain step, and the step
    numbers the bench's trainer step handed to the trainer's own loop body."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.workloads import plain_step, trainer_step
    from pipeline.build import make_accelerator
    from pipeline.loop import TrainLoop

    cfg = _tiny(batch)
    accelerator = make_accelerator(cfg)
    images = torch.rand(16 * batch * world, 784) * 2 - 1
    seen: list[int] = []
    original = TrainLoop.step_all_ranks

    def recording(self, step, agree=False):
        seen.append(step)
        return original(self, step, agree)

    TrainLoop.step_all_ranks = recording
    counts = {}
    for name, step in (
        ("trainer", trainer_step(cfg, accelerator, images)[0]),
        ("plain", plain_step(cfg, accelerator.device, images)),
    ):
        with FlopCounterMode(display=False) as counter:
            step()
        counts[name] = int(counter.get_total_flops())
        if name == "trainer":
            step()
            step()
    return {**counts, "loop_steps": seen}


@pytest.mark.parametrize("world", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_torch_counts_the_closed_form_flops_in_one_real_step_on_each_rank(world):
    batch = 8
    results = run_on_ranks(
        _count_real_steps, world, batch, env={"ACCELERATE_USE_CPU": "1"}, timeout=180
    )
    shapes = {"G": TINY_G, "D": TINY_D}
    for result in results:
        assert result["trainer"] == batch * trainer_flops_per_image(shapes)
        assert result["plain"] == batch * plain_flops_per_image(shapes)
        # The bench times TrainLoop.step_all_ranks itself, with the trainer's step count.
        assert result["loop_steps"] == [0, 1, 2]


def test_format_table_widths_fit_the_widest_header_or_cell():
    text = format_table(
        [Column("batch"), Column("img/s", ".0f"), Column("efficiency", ".1%")],
        [(64, 1689.4, 0.5423), (4096, 123456.7, 1.0)],
    )
    lines = text.splitlines()
    assert lines == [
        "batch   img/s  efficiency",
        "-----  ------  ----------",
        "   64    1689       54.2%",
        " 4096  123457      100.0%",
    ]


def test_format_table_aligns_numbers_right_and_text_left_unless_told():
    text = format_table(
        [Column("name"), Column("n"), Column("width", align=">"), Column("note")],
        [("trainer", 7, "x1", "a"), ("plain", 12345, "x2", None)],
    )
    assert text.splitlines() == [
        "name         n  width  note",
        "-------  -----  -----  ----",
        "trainer      7     x1  a",
        "plain    12345     x2  -",
    ]


def test_format_table_rejects_a_row_of_the_wrong_length():
    with pytest.raises(ValueError, match="a row has 1 cells for 2 columns"):
        format_table([Column("a"), Column("b")], [(1,)])


def test_check_targets_pass_at_the_threshold_and_miss_below_it():
    report = {
        "meta": {"precision": "no", "device": "cpu", "nproc": 2},
        "throughput": [
            {"batch": 64, "trainer_over_plain": 1.3, "trainer_over_limit": 0.1},
            {"batch": 256, "trainer_over_plain": 1.29, "trainer_over_limit": 0.81},
        ],
    }
    got = {t["target"]: t["status"] for t in check_targets(report)}
    assert got == {
        "trainer/plain at batch 64": "PASS",
        "trainer/plain at batch 256": "MISS",
        "trainer/limit at batch 256": "PASS",
    }  # no scaling rows in this report: its targets are left out, not failed


def test_check_targets_compare_the_trainer_efficiency_with_the_peer_of_the_same_run():
    report = {
        "meta": {"precision": "no", "device": "cpu", "nproc": 2},
        "weak_scaling": {
            "rows": [
                {"batch": 64, "efficiency": 0.65, "efficiency_over_peer": 0.99},
                {"batch": 256, "efficiency": 0.87, "efficiency_over_peer": 1.0},
            ]
        },
    }
    got = {t["target"]: t["status"] for t in check_targets(report)}
    assert got == {
        "weak-scaling efficiency 1->2 processes at batch 64": "PASS",
        "weak-scaling efficiency 1->2 processes at batch 256": "MISS",
        "trainer efficiency / plain DDP peer efficiency at batch 64": "MISS",
        "trainer efficiency / plain DDP peer efficiency at batch 256": "PASS",
    }


def _peer_after_one_step(rank: int, world: int, batch: int) -> dict:
    """On each rank: the plain DDP peer's modules, and G's BatchNorm running statistics and every
    parameter after one step on this rank's shard."""
    from torch.nn.parallel import DistributedDataParallel

    from bench.workloads import ddp_peer_step

    cfg = _tiny(batch)
    images = torch.rand(16 * batch * world, 784) * 2 - 1
    step, G, D = ddp_peer_step(cfg, torch.device("cpu"), images)
    step()
    norms = [m for m in G.module.modules() if "Norm" in type(m).__name__]
    return {
        "ddp": [isinstance(net, DistributedDataParallel) for net in (G, D)],
        "norm_types": [type(m) for m in norms],
        "running_stats": [torch.cat([m.running_mean, m.running_var]) for m in norms],
        "params": [p.detach().clone() for net in (G, D) for p in net.parameters()],
    }


@pytest.mark.slow
def test_the_peer_is_ddp_with_unsynchronized_batchnorm_equal_weights_per_rank_statistics():
    ranks = run_on_ranks(_peer_after_one_step, 2, 8, timeout=120)
    for result in ranks:
        assert result["ddp"] == [True, True]
        assert result["norm_types"] == [torch.nn.BatchNorm1d] * 2  # not SyncBatchNorm or ours
    # DDP averaged the gradients: one update, the same weights on both ranks...
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1)
    # ...while each rank's BatchNorm saw only its own batch: its running statistics are its own.
    for s0, s1 in zip(ranks[0]["running_stats"], ranks[1]["running_stats"]):
        assert not torch.allclose(s0, s1)


@pytest.mark.slow
def test_quick_throughput_bench_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--only", "throughput", "--device", "cpu"],
        cwd=ROOT,
        env={**os.environ, "BENCH_JSON": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {
        "meta",
        "plan",
        "flop_check",
        "throughput",
        "curves",
        "contended",
        "targets",
    }
    assert [row["batch"] for row in report["throughput"]] == [64, 256]
    for row in report["throughput"]:
        for what in ("trainer", "plain", "limit"):
            assert row[what]["images_per_s"] > 0
        ratio = row["trainer"]["images_per_s"] / row["plain"]["images_per_s"]
        assert row["trainer_over_plain"] == pytest.approx(ratio)
    for check in report["flop_check"].values():
        assert check["counted_by_torch"] == check["listed"] == check["closed_form"]
    # The cost curves: x1 at the throughput batches (the same timings), x2 at batch 64.
    curves = report["curves"]
    assert [(r["width_multiplier"], r["batch"]) for r in curves["batch"]] == [(1, 64), (1, 256)]
    assert [(r["width_multiplier"], r["batch"]) for r in curves["width"]] == [(1, 64), (2, 64)]
    assert curves["batch"][0]["trainer"] == report["throughput"][0]["trainer"]
    assert curves["width"][1]["flop_per_image"] > curves["width"][0]["flop_per_image"]
    assert report["meta"]["quick"] is True and report["meta"]["device"] == "cpu"
    assert "trainer img/s" in done.stdout and "== targets" in done.stdout


@pytest.mark.slow
def test_quick_scaling_bench_puts_the_plain_ddp_peer_next_to_the_trainer_in_its_json(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--only", "scaling", "--device", "cpu"],
        cwd=ROOT,
        env={**os.environ, "BENCH_JSON": str(out)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scaling = json.loads(out.read_text())["weak_scaling"]
    assert [row["batch"] for row in scaling["rows"]] == [64, 256]
    for row in scaling["rows"]:
        p1, p2 = row["peer_one_process_images_per_s"], row["peer_two_processes_images_per_s"]
        assert p1 > 0 and p2 > 0
        assert row["peer_efficiency"] == pytest.approx(p2 / (2 * p1))
        assert row["efficiency_over_peer"] == pytest.approx(
            row["efficiency"] / row["peer_efficiency"]
        )
        assert len(row["peer_efficiency_per_round"]) == scaling["rounds"] == 1
        # Measured inside the trainer's own launches, DDP-wrapped only where there are 2 ranks.
        assert [run["wrapper"] for run in row["peer_one_process"]] == ["Sequential"]
        assert [run["wrapper"] for run in row["peer_two_processes"]] == ["DistributedDataParallel"]
        assert row["peer_two_processes"][0]["batchnorm"] == "BatchNorm1d"
    assert "peer eff" in done.stdout and "trainer eff" in done.stdout
    targets = {t["target"] for t in json.loads(out.read_text())["targets"]}
    assert "trainer efficiency / plain DDP peer efficiency at batch 256" in targets


@pytest.mark.slow
def test_quick_device_section_reports_steps_per_second_and_no_mfu_without_a_known_peak(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "bench/bench.py", "--quick", "--only", "device", "--device", "cpu"],
        cwd=ROOT,
        env={**os.environ, "BENCH_JSON": str(out)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["device"]
    assert [(r["precision"], r["compile_mode"], r["batch"]) for r in rows] == [
        ("no", None, 64),
        ("no", None, 256),
        ("bf16", None, 64),
        ("bf16", None, 256),
    ]
    for row in rows:
        assert row["steps_per_s"] == pytest.approx(row["images_per_s"] / row["batch"])
        assert row["mfu"] is None  # a CPU has no entry in the peak table
    assert "steps/s" in done.stdout and "MFU" in done.stdout


def test_mfu_uses_the_peak_of_the_precision_or_the_override():
    from bench.bench import peak_flops

    cpu = torch.device("cpu")
    assert peak_flops(cpu, "no", None) is None
    assert peak_flops(cpu, "bf16", 100.0) == 100e12


def test_the_profile_counts_operator_time_and_other_threads_on_one_process():
    from bench.profile_worker import profile_full

    a = torch.randn(256, 256)
    result = profile_full(lambda: a @ a, 5)
    assert result["steps"] == 5 and result["operator_ms_per_step"] > 0
    assert result["wall_ms_per_step"] >= result["operator_ms_per_step"] * 0.5
    assert result["collective_issue_ms_per_step"] == 0
    assert result["other_threads_cpu_ms_per_step"] >= 0
