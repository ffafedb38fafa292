"""kernels.plan: the fused loss's launches, bytes and host side, captured without a GPU
(Triton installed, nothing run), and `python -m kernels.bench --model / --host`."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from kernels import bench, fused, pairs, plan, pool  # noqa: E402  (after the skip: imports Triton)


def test_launches_of_one_forward_backward_at_the_imagenet_structure() -> None:
    """ResNet-50 -> ResNet-50 (16 + 16 taps) at the real batch 256, on meta tensors: one
    pool forward and one GAP reduction per side, one pairs forward, two pairs backward
    kernels, one pool backward = 8 (issue #14's target: <= 8, whatever the number of taps)."""
    config = bench.GPU_CONFIGS["imagenet224-b256"]
    launches = bench.planned_launches(config, torch.bfloat16, "fwd+bwd")
    counts = {k.kernel: k.launches for k in plan.summarize(launches)}
    assert counts == {"_pool_fwd_kernel": 2, "_gap_reduce_kernel": 2, "_pairs_fwd_kernel": 1,
                      "_pairs_bwd_resized_kernel": 1, "_pairs_bwd_student_kernel": 1,
                      "_pool_bwd_kernel": 1}
    forward = bench.planned_launches(config, torch.bfloat16, "fwd")
    assert len(forward) == 5
    # one pool program per (sample, tap, block of 128 positions): 3 * 25 + 4 * 7 + 6 * 2 + 3
    (pool_fwd, *_), = [[x for x in forward if x.kernel.__name__ == "_pool_fwd_kernel"]]
    assert pool_fwd.grid == (256, 3 * 25 + 4 * 7 + 6 * 2 + 3)
    for cifar in ("cifar-b128", "cifar-b512"):  # 32x32, 16x16, 8x8 (and 4x4) taps: 8 too
        assert len(bench.planned_launches(bench.GPU_CONFIGS[cifar], torch.bfloat16,
                                          "fwd+bwd")) == 8


def test_bytes_of_a_pool_launch_by_hand() -> None:
    """One channels_last bf16 tap [4, 64, 8, 8]: one block covers its 64 positions (so no
    GAP reduction), and the launch reads z (4*64*64 * 2 B) and its tables (one tap row of 6
    int32, one work item of 2), and writes the fp32 map (4*64 * 4 B) and one GAP partial per
    channel (4*1*64 * 4 B), which is the GAP itself."""
    (launch, *rest), = [plan.loss_launches([(64, 8, 8)], [(64, 8, 8)], 4, torch.bfloat16,
                                           "channels_last")]
    assert launch.kernel.__name__ == "_pool_fwd_kernel" and launch.grid == (4, 1)
    assert rest[0].kernel.__name__ == "_pool_fwd_kernel"  # the student's: no reduction
    tables = 6 * 4 + 2 * 4
    assert plan.launch_bytes(launch) == 4 * 64 * 64 * 2 + tables + 4 * 64 * 4 + 4 * 64 * 4
    assert plan.projection_ms([launch], 1.0) == pytest.approx(
        plan.launch_bytes(launch) / 1e9 * 1e3)


def test_lane_use_of_a_pool_launch_by_hand() -> None:
    """A channels_last [2, 64, 7, 7] tap: tiles of 64 positions x 32 channels (BLOCK_HW is
    the next power of two of 49), two channel blocks per program, so 2 * 64 * 64 slots hold
    2 * 49 * 64 elements of data (77 %); the pairs kernels report none."""
    launches = plan.loss_launches([(64, 7, 7)], [(64, 7, 7)], 2, torch.bfloat16,
                                  "channels_last")
    assert launches[0].kwargs["BLOCK_HW"] == 64 and launches[0].kwargs["BLOCK_C"] == 32
    assert plan.tile_use(launches[0]) == (2 * 64 * 64, 2 * 49 * 64)
    lines = {k.kernel: k for k in plan.summarize(launches)}
    assert lines["_pool_fwd_kernel"].lane_use == pytest.approx(49 / 64)
    assert lines["_pairs_fwd_kernel"].lane_use is None


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
    assert host[:3] == ["cifar-b128", "15+8", "8"]  # 2 pool fwd, 2 GAP sums, 3 pairs, 1 bwd
    assert len(host) == 9 and all(float(ms) > 0 for ms in host[3:])  # the no-op floor too
    assert bench.main(["--model", "--configs", "cifar-cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernels.bench: error: --model / --host take GPU configs") and \
        err.count("\n") == 1, err


def test_host_timings_side_by_side_keep_each_run_apart() -> None:
    """host_ms_side_by_side times each run on its own inputs (launch counts per run), and the
    --host column's narrow taps keep every tap's size and alignment: channels multiples of
    16, ~1/16 of the original."""
    config = bench.GPU_CONFIGS["cifar-b128"]
    make_full = bench.host_inputs(config, torch.float32)
    make_narrow = bench.host_inputs(config, torch.float32, bench.HOST_CHANNEL_DIVISOR)
    narrow, full = make_narrow(), make_full()
    for ours, theirs in zip([*narrow.teacher, *narrow.student], [*full.teacher, *full.student],
                            strict=True):
        assert ours.shape[0] == theirs.shape[0] == 2 and ours.shape[2:] == theirs.shape[2:]
        assert ours.shape[1] % 16 == 0 and ours.shape[1] == 16 * math.ceil(theirs.shape[1] / 256)
    results = plan.host_ms_side_by_side(
        [(bench.ops_loss(fused), make_full), (plan.no_op_loss, make_full),
         (bench.ops_loss(fused), make_narrow)], reps=2)
    assert [launches for _, _, launches in results] == [8, 0, 8]
    assert all(0 < fwd < both for fwd, both, _ in results)


def test_the_host_functions_never_read_the_device() -> None:
    """What a CUDA-graph capture forbids: every host function of a loss forward + backward
    runs on meta tensors (loss_launches), where any read of a device value back to the host
    (.item(), float(t), .tolist(), a tensor's truth value) raises; and the pairs
    and pool tables are made once per shape signature, then reused (no host-to-device copy
    per call)."""
    with pytest.raises(RuntimeError, match="meta"):  # the premise: meta refuses a sync
        float(torch.empty((), device="meta"))
    for config in bench.GPU_CONFIGS.values():
        assert bench.planned_launches(config, torch.bfloat16, "fwd+bwd")
    t_sizes, s_sizes = ((8, 8), (4, 4)), ((6, 6),)
    plan_a = pairs.pair_plan(t_sizes, s_sizes, torch.device("meta"))
    assert pairs.pair_plan(t_sizes, s_sizes, torch.device("meta")) is plan_a
    assert plan_a.groups.device.type == "meta"
    taps = [torch.empty(2, 16, 8, 8, device="meta"), torch.empty(2, 32, 4, 4, device="meta")]
    pool_a = pool.pool_plan(taps)
    assert pool.pool_plan([z.clone() for z in taps]) is pool_a
    assert pool_a.groups[0].tap_table.device.type == "meta"


def test_the_one_node_op_checks_its_taps_on_the_triton_path() -> None:
    """fused.feature_terms on the Triton path (routed there on CPU tensors, kernels stubbed)
    refuses bad taps with the reference's errors, and keeps refusing them: the plans it caches
    per signature are stored only after the check passed."""
    counter = [0]
    with plan.stubbed_kernels(counter):
        for _ in range(2):
            with pytest.raises(ValueError, match="at least one teacher tap and one student"):
                fused.feature_terms([], [torch.rand(2, 3, 2, 2)])
            with pytest.raises(ValueError, match="one batch size"):
                fused.feature_terms([torch.rand(2, 3, 2, 2)], [torch.rand(3, 3, 2, 2)])
            with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
                fused.feature_terms([torch.rand(2, 3, 2)], [torch.rand(2, 3, 2, 2)])
        assert counter[0] == 0  # nothing launched for bad taps
        taps = [torch.rand(2, 3, 4, 4)], [torch.rand(2, 5, 2, 2, requires_grad=True)]
        for _ in range(2):  # the second call takes the cached plans
            t_gaps, s_gaps, d = fused.feature_terms(*taps)
            assert (t_gaps.shape, s_gaps.shape, d.shape) == ((2, 3), (2, 5), (2, 1, 1))
        assert counter[0] == 2 * 3  # pool forward per side (one block each), pairs forward


def test_tile_variants_table_of_a_small_config() -> None:
    """kernels.bench --tiles' rows on CPU tensors, the kernels stubbed and the timer
    injected (what is counted, not how fast): launches per forward and backward, each timed
    call making them, and the forward's lane use by hand for the default tiles."""
    config = bench.Config("tiny", "", ((24, 12), (40, 7)), ((24, 10), (40, 5)), 2)
    calls = []

    def one_call(fn) -> float:
        fn()
        calls.append(fn)
        return 2.0

    counter = [0]
    with plan.stubbed_kernels(counter):
        rows = bench.tile_rows(config, torch.device("cpu"), torch.float32, 1.0, one_call)
    assert [row[:3] for row in rows] == [
        ("tiny", "default", "3+1"),  # 12x12 spans two blocks of 128: the teacher's reduction
        ("tiny", "64x64 for all", "4+1"),  # 10x10 spans two blocks of 64 too
        ("tiny", "small taps apart", "5+2"),  # 7x7 and 5x5 launched apart, each one block
    ]
    assert len(calls) == 6 and counter[0] == (3 + 1) + (4 + 1) + (5 + 2)
    # default tile 128 x 32: 12x12 -> 2 blocks x 1 channel block, 7x7 -> 1 x 2, 10x10 -> 1 x 1,
    # 5x5 -> 1 x 2 (batch 2), against the data 24*144 + 40*49 + 24*100 + 40*25 per sample
    slots = 2 * 128 * 32 * (2 + 2 + 1 + 2)
    data = 2 * (24 * 144 + 40 * 49 + 24 * 100 + 40 * 25)
    assert rows[0][3] == f"{data / slots:.0%}"
    # GB/s against what any variant moves: every tap read forward (fp32), the student's read
    # and their gradients written backward, in the 2 ms the timer reports
    student = 2 * (24 * 100 + 40 * 25) * 4
    for row in rows:
        assert row[4:] == ("2.000", f"{(data * 4) / 2e-3 / 1e9:.3g}",
                           f"{100 * (data * 4) / 2e-3 / 1e9:.1f}",
                           "2.000", f"{2 * student / 2e-3 / 1e9:.3g}",
                           f"{100 * 2 * student / 2e-3 / 1e9:.1f}"), row


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --tiles runs")
def test_tiles_need_a_gpu(capsys) -> None:
    assert bench.main(["--tiles"]) == 2
    err = capsys.readouterr().err
    assert "on a CUDA GPU" in err and len(err.strip().splitlines()) == 1
    assert err.startswith("kernels.bench: error: --tiles"), err
