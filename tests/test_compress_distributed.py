"""Two processes (torch.distributed, gloo on the CPU) compress their shares of the
groups; the result equals the single-process one."""
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fips_kernels as fk
from fips_kernels.compress import distributed

from compress_models import DIST_KW, dist_worker, plain_vit, tokens


def test_groups_are_dealt_by_size():
    from fips_kernels.compress.presets import find_preset, find_units, make_groups

    model = plain_vit(depth=5)
    groups = make_groups(find_units(model, find_preset(model)), 1)
    shares = distributed.assign(groups, 2)
    assert sorted(shares[0] + shares[1]) == [0, 1, 2, 3, 4]
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    assert distributed.assign(groups, 1) == [[0, 1, 2, 3, 4]]
    assert distributed.world() == (0, 1)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo "
                    "is not available in this torch build")
def test_two_processes_equal_one(tmp_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers use one thread each: the same kernels, the same sums
    try:
        with fk.use_backend("reference"):
            single, single_report = fk.compress(plain_vit(), calib_data=tokens(), **DIST_KW)
    finally:
        torch.set_num_threads(old)
    mp.spawn(dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    want = single.state_dict()
    reports = []
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        reports.append(json.loads((tmp_path / f"rank{rank}.json").read_text()))
    # each group was trained by exactly one rank, and both ranks trained some
    processes = [g["process"] for g in reports[0]["groups"]]
    assert sorted(set(processes)) == [0, 1]
    assert [g["process"] for g in reports[1]["groups"]] == processes
    assert [g["errors_final"] for g in reports[0]["groups"]] == [g.errors_final for g in single_report.groups]
    assert reports[0]["end_to_end"] == reports[1]["end_to_end"]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo "
                    "is not available in this torch build")
def test_ranks_with_different_weights_are_refused(tmp_path):
    """Each rank draws its own random weights: every rank refuses before training, with one message."""
    mp.spawn(dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path), True), nprocs=2, join=True)
    for rank in (0, 1):
        assert not (tmp_path / f"rank{rank}.pt").exists()
        err = (tmp_path / f"rank{rank}.err").read_text()
        assert err.startswith("RankMismatchError: compress: the processes hold different weights: rank 1 differs "
                              "from rank 0"), err
