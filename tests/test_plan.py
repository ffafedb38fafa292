"""kernels.plan: the fused loss's launches, bytes and host side, captured without a GPU
(Triton installed, nothing run), and `python -m kernels.bench --model / --host`."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels import bench, pairs, plan  # noqa: E402  (after the skip: imports Triton)


def test_launches_of_one_forward_backward_at_the_imagenet_structure() -> None:
    """ResNet-50 -> ResNet-50 (16 + 16 taps) at the real batch 256, on meta tensors: one
    pool forward per tap, one pairs forward, two pairs backward kernels, one pool backward
    per student tap = 51 (issue #14's target, grouped launches, is <= 8)."""
    config = bench.GPU_CONFIGS["imagenet224-b256"]
    launches = bench.planned_launches(config, torch.bfloat16, "fwd+bwd")
    counts = {k.kernel: k.launches for k in plan.summarize(launches)}
    assert counts == {"_pool_fwd_kernel": 32, "_pairs_fwd_kernel": 1,
                      "_pairs_bwd_resized_kernel": 1, "_pairs_bwd_student_kernel": 1,
                      "_pool_bwd_kernel": 16}
    forward = bench.planned_launches(config, torch.bfloat16, "fwd")
    assert len(forward) == 33
    # the 7x7x2048 taps: a [256, 1] grid, 256 programs (under 2 per SM of an H100)
    assert min(plan.programs(x) for x in forward) == 256


def test_bytes_of_a_pool_launch_by_hand() -> None:
    """One channels_last bf16 tap [4, 64, 8, 8]: one block covers its 64 positions, so the
    launch reads z (4*64*64 * 2 B) and writes the fp32 map (4*64 * 4 B) and one GAP partial
    per channel (4*1*64 * 4 B)."""
    (launch, *_), = [plan.loss_launches([(64, 8, 8)], [(64, 8, 8)], 4, torch.bfloat16,
                                        "channels_last")]
    assert launch.kernel.__name__ == "_pool_fwd_kernel" and launch.grid == (4, 1)
    assert plan.launch_bytes(launch) == 4 * 64 * 64 * 2 + 4 * 64 * 4 + 4 * 64 * 4
    assert plan.projection_ms([launch], 1.0) == pytest.approx(
        plan.launch_bytes(launch) / 1e9 * 1e3)


def test_planned_bytes_stay_near_the_floor() -> None:
    """Single-pass kernels: the plan moves at most 10% more than the bytes floor."""
    for config in bench.GPU_CONFIGS.values():
        for mode in bench.MODES:
            launches = bench.planned_launches(config, torch.bfloat16, mode)
            planned = sum(plan.launch_bytes(x) for x in launches)
            floor = bench.floor_bytes(config, torch.bfloat16, mode)
            assert floor <= planned <= 1.10 * floor, (config.name, mode, planned / floor)


def test_model_and_host_reports(capsys) -> None:
    assert bench.main(["--model", "--host", "--configs", "cifar-b128", "--cpu-reps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PROJECTION (not a measurement)")
    assert "all (floor 429.9 MB" in out and "_pairs_bwd_student_kernel" in out
    host = out.split("kernels stubbed out", 1)[1].splitlines()[-1].split()
    assert host[:3] == ["cifar-b128", "15+8", "34"]  # 15 + 8 pool fwd, 3 pairs, 8 pool bwd
    assert bench.main(["--model", "--configs", "cifar-cpu"]) == 2


def test_the_host_functions_never_read_the_device() -> None:
    """What a CUDA-graph capture forbids: every host function of a loss forward + backward
    runs on meta tensors (loss_launches), where any read of a device value back to the host
    (.item(), float(t), .tolist(), a tensor's truth value) raises; and the pairs tables are
    made once per shape signature, then reused (no host-to-device copy per call)."""
    with pytest.raises(RuntimeError, match="meta"):  # the premise: meta refuses a sync
        float(torch.empty((), device="meta"))
    for config in bench.GPU_CONFIGS.values():
        assert bench.planned_launches(config, torch.bfloat16, "fwd+bwd")
    t_maps = [torch.empty(2, 8, 8, device="meta"), torch.empty(2, 4, 4, device="meta")]
    s_maps = [torch.empty(2, 6, 6, device="meta")]
    plan_a = pairs.plan_for(t_maps, s_maps)
    assert pairs.plan_for([m.clone() for m in t_maps], s_maps) is plan_a
    assert plan_a.groups.device.type == "meta"
