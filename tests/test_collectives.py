"""The collectives that carry main-only or per-rank outcomes: a failure anywhere is raised on
every rank (the same type and message), never left for a peer to wait on."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_on_ranks


def _outcomes(rank: int, world: int) -> dict:
    from pipeline import distributed as d
    from pipeline.errors import DataError

    def fails_on_rank_1():
        if rank == 1:
            raise DataError("data root missing on this node")
        return rank

    results = {}
    for name, call in {
        "agree": lambda: d.agree_all_ranks(fails_on_rank_1),
        "main_only": lambda: d.run_on_main_all_ranks(
            lambda: (_ for _ in ()).throw(OSError("samples folder is not writable"))
        ),
        "local_main_first": lambda: d.local_main_first_all_ranks(fails_on_rank_1),
    }.items():
        try:
            results[name] = ("ok", call())
        except Exception as exc:
            results[name] = (type(exc).__name__, str(exc))
    results["agree_ok"] = d.agree_all_ranks(lambda: rank * 10)
    results["shared"] = d.run_on_main_all_ranks(lambda: {"rank": rank}, share_result=True)
    results["json"] = d.broadcast_json_all_ranks({"from": rank})
    results["bytes"] = d.gather_bytes_all_ranks(f"rank{rank}".encode() * (rank + 1))
    return results


@pytest.fixture(scope="module")
def outcomes():
    # One node, as torchrun sets it up: rank 1 is not its node's local main.
    return run_on_ranks(_outcomes, 2, timeout=120)


def test_a_failure_on_one_rank_is_raised_on_every_rank_with_its_type_and_message(outcomes):
    for rank in (0, 1):
        assert outcomes[rank]["agree"] == ("DataError", "data root missing on this node")
        assert outcomes[rank]["local_main_first"][0] == "DataError"


def test_main_only_failure_reaches_every_rank(outcomes):
    assert outcomes[0]["main_only"] == ("OSError", "samples folder is not writable")
    kind, message = outcomes[1]["main_only"]
    assert message.endswith("samples folder is not writable") and kind != "ok"


def test_results_are_per_rank_or_shared_as_asked(outcomes):
    assert [o["agree_ok"] for o in outcomes] == [0, 10]
    assert [o["shared"] for o in outcomes] == [{"rank": 0}, {"rank": 0}]
    assert [o["json"] for o in outcomes] == [{"from": 0}, {"from": 0}]
    assert outcomes[0]["bytes"] == outcomes[1]["bytes"] == [b"rank0", b"rank1rank1"]
