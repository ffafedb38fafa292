"""kernels.fused: the registered ops on the CPU (reference dispatch), torch.compile, the loss
backend, the benchmark script, and (in a subprocess) the Triton kernels under the interpreter.

The Triton kernels themselves are checked by tests/test_kernels_triton.py, which needs
TRITON_INTERPRET=1 before Triton is imported: test_triton_kernels_under_interpreter runs it in
a fresh interpreter so nothing in this process changes.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.autograd import gradcheck

from fastibd.method.loss import kernel_backend
from kernels import bench, common, fused, pairs, pool, reference
from tests.conftest import cli_error
from tests.feature_loss_check import assert_fused_matches_eager

ROOT = Path(__file__).resolve().parents[1]


def positive_maps(batch: int, sizes, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.rand(batch, h, w, generator=gen) + 0.05 for h, w in sizes]


# ------------------------------------------------------------ the Triton kernels (subprocess)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="already interpreting: tests/test_kernels_triton.py runs directly")
def test_triton_kernels_under_interpreter() -> None:
    """Runs tests/test_kernels_triton.py with TRITON_INTERPRET=1 and NaN-poisoned outputs in a
    fresh Python (the flag must precede the Triton import; this process stays untouched)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "FASTIBD_POISON_OUTPUTS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "test_kernels_triton.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert summary and "passed" in summary[0] and "skipped" not in summary[0], summary


# ------------------------------------------------------------------- import and dispatch


def test_fused_imports_and_runs_without_triton() -> None:
    """kernels.fused must import on any machine ("auto" probes it): without Triton the op
    modules import with a stand-in (kernels.common) and every op runs the reference."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` fail
        "import torch\n"
        "from kernels import common, fused\n"
        "assert not common.triton_available()\n"
        "z = torch.randn(2, 3, 4, 4, requires_grad=True)\n"
        "m, g = fused.pool(z)\n"
        "d = fused.pair_distances([m.detach()], [m])\n"
        "fused.weighted_sum(d, torch.ones_like(d)).backward()\n"
        "assert z.grad is not None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_backend_resolves_to_the_fused_ops_and_survives_deepcopy() -> None:
    ops_fused = kernel_backend("fused")
    assert ops_fused.feature_terms is fused.feature_terms
    assert ops_fused.weighted_sum is fused.weighted_sum
    assert copy.deepcopy(ops_fused) == ops_fused
    assert kernel_backend("auto", "cpu").feature_terms is reference.feature_terms
    # the dispatch rule: no Triton for CPU tensors (outside the interpreter) or float64
    assert not common.use_triton([torch.zeros(1)])
    assert not common.use_triton([torch.zeros(1, dtype=torch.float64)])


def test_errors_match_the_reference() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        fused.pool(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at least one"):
        fused.pair_distances([], [torch.rand(1, 2, 2)])
    with pytest.raises(ValueError, match="one batch size"):
        fused.pair_distances([torch.rand(2, 2, 2)], [torch.rand(3, 2, 2)])
    for empty in ((2, 4, 1, 0), (2, 0, 3, 3)):  # no position or no channel: no mean
        for ops in (fused, reference):
            with pytest.raises(ValueError, match="C, H, W >= 1"):
                ops.pool_taps([torch.rand(2, 4, 3, 3), torch.rand(empty)])
    for ops in (fused, reference):
        with pytest.raises(ValueError, match="at least one teacher tap and one student tap"):
            ops.feature_terms([], [torch.rand(2, 3, 2, 2)])
        with pytest.raises(ValueError, match="one batch size"):
            ops.feature_terms([torch.rand(2, 3, 2, 2)], [torch.rand(3, 3, 2, 2)])


# ------------------------------------------------------------- CPU dispatch = the reference


def test_feature_terms_treat_the_teacher_as_a_constant() -> None:
    """Both implementations return the GAPs of each side and the distances of the maps as
    pool_taps and packed_pair_distances make them, and never send a gradient into the
    teacher, even when its taps ask for one (a teacher that was not frozen)."""
    gen = torch.Generator().manual_seed(3)
    t_taps = [torch.randn(2, 4, 6, 6, generator=gen).requires_grad_(),
              torch.randn(2, 3, 3, 3, generator=gen).requires_grad_()]
    s_taps = [torch.randn(2, 5, 4, 4, generator=gen).requires_grad_()]
    t_maps, t_gaps = reference.pool_taps(t_taps)
    s_maps, s_gaps = reference.pool_taps(s_taps)
    d = reference.packed_pair_distances(t_maps, s_maps, [(6, 6), (3, 3)], [(4, 4)])
    for ops in (reference, fused):
        got = ops.feature_terms(t_taps, s_taps)
        for g, w in zip(got, (t_gaps, s_gaps, d), strict=True):
            torch.testing.assert_close(g, w)
        assert not got[0].requires_grad and got[1].requires_grad and got[2].requires_grad
        (got[1].sum() + got[2].sum()).backward()
        assert all(z.grad is None for z in t_taps) and s_taps[0].grad is not None
        s_taps[0].grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pool_on_cpu_matches_reference(dtype: torch.dtype, channels_last: bool) -> None:
    z = torch.randn(2, 5, 3, 4).to(dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    z.requires_grad_()
    g_map, g_gap = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5,
                                                                          dtype=torch.float64)
    got_map, got_gap = fused.pool(z)
    want_map, want_gap = reference.pool(z)
    assert got_map.dtype == got_gap.dtype == want_map.dtype
    torch.testing.assert_close(got_map, want_map)
    torch.testing.assert_close(got_gap, want_gap)
    (got,) = torch.autograd.grad(
        (got_map * g_map.to(got_map.dtype)).sum() + (got_gap * g_gap.to(got_gap.dtype)).sum(), z)
    (want,) = torch.autograd.grad(
        (want_map * g_map.to(want_map.dtype)).sum() + (want_gap * g_gap.to(want_gap.dtype)).sum(),
        z)
    assert got.dtype == z.dtype and got.stride() == z.stride()  # dz in z's memory format
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("teacher_grad", [False, True])
def test_pair_distances_on_cpu_match_reference(teacher_grad: bool) -> None:
    """Values and gradients of the fused op's reference path (its backward is written out in
    torch, kernels.pairs.pairs_backward_torch) against autograd of the specification, including
    an all-zero student map (normalize's eps branch)."""
    gen = torch.Generator().manual_seed(1)
    t_maps = positive_maps(3, [(5, 7), (3, 3), (5, 7)], gen)
    s_maps = positive_maps(3, [(9, 11), (4, 6), (2, 3), (1, 1)], gen)
    s_maps[1][2] = 0.0
    t_maps = [t.requires_grad_(teacher_grad) for t in t_maps]
    s_maps = [s.requires_grad_() for s in s_maps]
    grad_d = torch.rand(3, 3, 4, generator=gen)
    leaves = (t_maps if teacher_grad else []) + s_maps
    got = fused.pair_distances(t_maps, s_maps)
    want = reference.pair_distances(t_maps, s_maps)
    torch.testing.assert_close(got, want)
    got_grads = torch.autograd.grad(got, leaves, grad_d)
    want_grads = torch.autograd.grad(want, leaves, grad_d)
    for g, w in zip(got_grads, want_grads, strict=True):
        # atol: gradients are O(1e-2) except the zero map's (O(1e11), checked by rtol) and the
        # 1x1 map's, which is 0 up to round-off (a constant map normalizes to a constant)
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_gradcheck_fused_ops_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=gen)
    assert gradcheck(fused.pool, (z.to(memory_format=torch.channels_last).requires_grad_(),))
    t_maps = [m.double().requires_grad_() for m in positive_maps(2, [(3, 2), (2, 2)], gen)]
    s_maps = [m.double().requires_grad_() for m in positive_maps(2, [(5, 3), (1, 2)], gen)]

    def distances(*maps: torch.Tensor) -> torch.Tensor:
        return fused.pair_distances(maps[:2], maps[2:])

    assert gradcheck(distances, (*t_maps, *s_maps))


def test_autocast_keeps_fp32_outputs() -> None:
    """Under autocast the ops get the taps as they are (custom ops are not in autocast's
    lists) and return fp32, exactly as the reference does."""
    z = torch.randn(2, 4, 3, 3).bfloat16().to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_map, got_gap = fused.pool(z)
        want_map, want_gap = reference.pool(z)
        d = fused.pair_distances([got_map], [got_map])
    assert got_map.dtype == got_gap.dtype == d.dtype == torch.float32
    torch.testing.assert_close(got_map, want_map)
    torch.testing.assert_close(got_gap, want_gap)


# ------------------------------------------------------------------ torch.library contract


def test_opcheck_all_ops() -> None:
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(2, 5, 3, 4, generator=gen)
    z_cl = torch.randn(2, 5, 3, 4, generator=gen).bfloat16()
    z_cl = z_cl.to(memory_format=torch.channels_last)
    torch.library.opcheck(pool.pool_taps_op, ([z.requires_grad_()],))
    torch.library.opcheck(pool.pool_taps_op, ([z.detach(), z_cl, torch.randn(2, 3, 1, 2)],))
    torch.library.opcheck(pool.pool_taps_backward_op, ([z.detach()], torch.randn(2, 12), None))
    torch.library.opcheck(pool.pool_taps_backward_op,
                          ([z_cl, z.detach()], None, torch.randn(2, 10)))
    # taps the kernels would copy (H and W transposed, a channel slice of channels_last, a
    # batch step): the fake promises the layout of the real dz
    base = torch.randn(4, 6, 3, 4, generator=gen)
    awkward = [base.permute(0, 1, 3, 2), base.to(memory_format=torch.channels_last)[::2, 1:4]]
    torch.library.opcheck(pool.pool_taps_backward_op,
                          ([awkward[0][::2], awkward[1]], torch.randn(2, 24), torch.randn(2, 9)))
    t_maps = positive_maps(2, [(4, 4), (3, 5)], gen)
    s_maps = positive_maps(2, [(3, 3), (8, 8), (1, 1)], gen)
    t_sizes = [v for m in t_maps for v in m.shape[1:]]
    s_sizes = [v for m in s_maps for v in m.shape[1:]]
    t_packed, s_packed = pairs.pack(t_maps), pairs.pack(s_maps)
    torch.library.opcheck(pairs.pair_distances_op,
                          (t_packed, s_packed.requires_grad_(), t_sizes, s_sizes))
    for need_t, need_s in ((True, True), (False, True), (True, False)):
        args = (torch.rand(2, 2, 3), t_packed, s_packed.detach(), t_sizes, s_sizes,
                torch.empty(0), need_t, need_s)
        torch.library.opcheck(pairs.pair_distances_backward_op, args)


def _hot_path(t_feats, s_feats, attn):
    """feature_terms of all taps, weighted sum, plus a GAP term (so the GAPs get a
    gradient), as FeatureDistillation calls them."""
    _, s_gaps, d = fused.feature_terms(t_feats, s_feats)
    return fused.weighted_sum(d, attn) + s_gaps.square().mean()


def test_compile_fullgraph_matches_eager() -> None:
    """torch.compile(fullgraph=True) traces the ops (fake functions, autograd formulas, the
    backward ops) without graph breaks; backend aot_eager also runs the traced backward
    graph. (Inductor works too, but costs ~10 s more here.)"""
    gen = torch.Generator().manual_seed(4)
    t_feats = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)]
    s_feats = [torch.randn(2, 3, 8, 8, generator=gen).to(memory_format=torch.channels_last),
               torch.randn(2, 5, 2, 2, generator=gen)]
    s_feats = [s.requires_grad_() for s in s_feats]
    attn = torch.rand(2, 2, 2, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(_hot_path, backend="aot_eager", fullgraph=True)
    got = compiled(t_feats, s_feats, attn)
    want = _hot_path(t_feats, s_feats, attn)
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, s_feats), torch.autograd.grad(want, s_feats),
                    strict=True):
        torch.testing.assert_close(g, w)
    explanation = torch._dynamo.explain(_hot_path)(t_feats, s_feats, attn)
    assert explanation.graph_break_count == 0


# ------------------------------------------------------------------------- the real loss


def test_feature_distillation_fused_equals_eager_on_model_taps() -> None:
    """FeatureDistillation(backend='fused') vs 'eager' on the taps of two tiny ResNet-18s,
    same attention weights: value and gradients (student parameters, attention). On the CPU
    the fused ops dispatch to the reference, so this checks the op wiring end to end; the
    same test with the Triton kernels runs in tests/test_kernels_triton.py."""
    from fastibd.models import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet18", width_mult=1 / 8, normalization="none").eval()
    student = build_model("resnet18", width_mult=1 / 8, normalization="none")
    x = torch.rand(4, 3, 16, 16).to(memory_format=torch.channels_last)
    with torch.no_grad():
        _, t_taps = teacher(x, features=True)
    _, s_taps = student(x, features=True)
    assert_fused_matches_eager(t_taps, s_taps, student, {}, dict(rtol=1e-4, atol=1e-7))


# ----------------------------------------------------------------------------- the bench


def test_bench_cpu_mode_writes_table_csv_and_plot(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    code = bench.main(["--device", "cpu", "--configs", "imagenet160-cpu", "--modes", "fwd",
                       "--cpu-reps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "CUDA is not available" in printed and "median ms" in printed
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert rows[0].startswith("config,") and len(rows) == 3  # eager and fused, fwd
    assert (out / "results.png").stat().st_size > 0


def test_bench_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        bench.main(["--providers", "eager,nope"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "unknown provider nope" in err
    assert len(err.strip().splitlines()) == 1 and err.rstrip().endswith("(see --help)")
    assert err.startswith("kernels.bench: error: argument --providers"), err
    line = cli_error(bench.main, ["--device", "cpu", "--configs", "cifar-b128"], capsys)
    assert line.startswith("kernels.bench: error: config(s) cifar-b128 are for the GPU"), line


def test_bench_refuses_an_out_that_is_a_file_before_timing(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*args, **kwargs):
        raise AssertionError("timed before checking --out")

    for name in ("check_fused", "run_config"):
        monkeypatch.setattr(bench, name, reached)
    taken = tmp_path / "results.csv"
    taken.write_text("")
    line = cli_error(bench.main, ["--device", "cpu", "--configs", "imagenet160-cpu", "--out",
                                  str(taken)], capsys)
    assert line == f"kernels.bench: error: --out {taken} is a file, not a directory", line


def test_bench_shapes_are_the_documented_taps() -> None:
    cifar = bench.GPU_CONFIGS["cifar-b512"]
    assert len(cifar.teacher) == 15 and len(cifar.student) == 8 and cifar.batch == 512
    assert cifar.teacher[0] == (160, 32) and cifar.student[-1] == (512, 4)
    imagenet = bench.GPU_CONFIGS["imagenet224-b256"]
    assert len(imagenet.teacher) == len(imagenet.student) == 16
    assert imagenet.teacher[0] == (256, 56) and imagenet.teacher[-1] == (2048, 7)
    assert bench.GPU_CONFIGS["imagenet160-b256"].teacher[-1] == (2048, 5)


# ----------------------------------------------------- on a GPU (skipped on the CPU machines)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(8, 160, 32, 32), (4, 2048, 7, 7), (3, 5, 3, 7),
                                   (2, 1, 1, 1), (2, 256, 56, 56)])
def test_cuda_pool_matches_float64(shape, channels_last: bool, dtype: torch.dtype,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled kernels (not the interpreter) at real tap shapes, NaN-poisoned outputs."""
    monkeypatch.setenv("FASTIBD_POISON_OUTPUTS", "1")
    z = torch.randn(shape, device="cuda").to(dtype)
    if channels_last:
        z = z.to(memory_format=torch.channels_last)
    z.requires_grad_()
    channel_map, gap = fused.pool(z)
    g_map, g_gap = torch.randn_like(channel_map), torch.randn_like(gap)
    (dz,) = torch.autograd.grad((channel_map * g_map).sum() + (gap * g_gap).sum(), z)
    z64 = z.detach().cpu().double().requires_grad_()
    want_map, want_gap = reference.pool(z64)
    (want_dz,) = torch.autograd.grad(
        (want_map * g_map.cpu().double()).sum() + (want_gap * g_gap.cpu().double()).sum(), z64)
    torch.testing.assert_close(channel_map.cpu().double(), want_map, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gap.cpu().double(), want_gap, rtol=1e-5, atol=1e-6)
    assert dz.dtype == z.dtype and dz.stride() == z.stride()
    rtol = bench.GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(dz.cpu().double(), want_dz, rtol=rtol,
                               atol=rtol * want_dz.abs().max().item())


@needs_cuda
def test_cuda_grouped_pool_of_mixed_taps(monkeypatch: pytest.MonkeyPatch) -> None:
    """One pool_taps call over taps of three dtypes and both layouts at ResNet-50 shapes
    (several launch groups, several spatial blocks: the GAP reduction), NaN-poisoned
    outputs: every tap's map, GAP and dz against float64 at its own packed offset."""
    monkeypatch.setenv("FASTIBD_POISON_OUTPUTS", "1")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(256, 56, 56, torch.bfloat16, True), (512, 28, 28, torch.bfloat16, True),
              (1024, 14, 14, torch.float16, True), (2048, 7, 7, torch.float32, False),
              (5, 3, 7, torch.float32, True)]
    taps = []
    for c, h, w, dtype, channels_last in shapes:
        z = torch.randn((3, c, h, w), generator=gen, device="cuda").to(dtype)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        taps.append(z.contiguous(memory_format=fmt).requires_grad_())
    maps, gaps = fused.pool_taps(taps)
    g_maps, g_gaps = torch.randn_like(maps), torch.randn_like(gaps)
    dzs = torch.autograd.grad((maps * g_maps).sum() + (gaps * g_gaps).sum(), taps)
    z64 = [z.detach().cpu().double().requires_grad_() for z in taps]
    want_maps, want_gaps = reference.pool_taps(z64)
    want_dzs = torch.autograd.grad((want_maps * g_maps.cpu().double()).sum()
                                   + (want_gaps * g_gaps.cpu().double()).sum(), z64)
    torch.testing.assert_close(maps.cpu().double(), want_maps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaps.cpu().double(), want_gaps, rtol=1e-5, atol=1e-5)
    for z, dz, want in zip(taps, dzs, want_dzs, strict=True):
        assert dz.dtype == z.dtype and dz.stride() == z.stride()
        rtol = bench.GRAD_TOLERANCE[z.dtype]
        torch.testing.assert_close(dz.cpu().double(), want, rtol=rtol,
                                   atol=rtol * want.abs().max().item())


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", list(bench.GPU_CONFIGS))
def test_cuda_loss_matches_reference_at_bench_shapes(config: str, dtype: torch.dtype) -> None:
    ok, summary = bench.check_fused(bench.GPU_CONFIGS[config], torch.device("cuda"), dtype)
    assert ok, summary


@needs_cuda
def test_cuda_graph_capture_of_the_loss_is_taken() -> None:
    """torch.compile(mode="reduce-overhead") of the loss forward+backward on the fused ops
    records a CUDA graph: no op in them forces Inductor to skip the capture (a host sync, a
    CPU tensor, a data-dependent shape would be counted in cudagraph_skips)."""
    from torch._dynamo.utils import counters

    config = bench.CPU_CONFIGS["cifar-cpu"]  # the CIFAR tap structure, small channels
    inputs = bench.make_inputs(config, torch.device("cuda"), torch.bfloat16)
    loss = bench.ops_loss(fused)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(lambda x: loss(x), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        for s in inputs.student:
            s.grad = None
        compiled(inputs).backward()
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert all(s.grad is not None and torch.isfinite(s.grad).all() for s in inputs.student)
