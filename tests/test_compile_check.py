"""kernels.compile_check: every Triton kernel compiled for sm_80 and sm_90 at the launches the
CIFAR and ImageNet configs make (bf16, fp16, fp32; NCHW and channels_last), on this CPU-only
machine, with no spills, at most 128 registers, and vectorized loads where the JIT knows the
streamed axis is aligned."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from kernels import compile_check  # noqa: E402  (after the skip: imports Triton)


def test_every_kernel_compiles_for_sm80_and_sm90_within_budget() -> None:
    results = compile_check.run_checks(list(compile_check.CONFIGS), list(compile_check.DTYPES),
                                       list(compile_check.LAYOUTS), list(compile_check.ARCHS))
    table = compile_check.format_table(results)
    assert not [r for r in results if r.problems], table
    kernels = {r.kernel for r in results}
    assert kernels == {"_pool_fwd_kernel", "_gap_reduce_kernel", "_pool_bwd_kernel",
                       "_pairs_fwd_kernel", "_pairs_bwd_resized_kernel",
                       "_pairs_bwd_student_kernel"}
    assert {r.arch for r in results} == {"80", "90"}
    # the bandwidth-bound pool kernels stream bf16 channels_last taps with vector accesses
    # (128-bit for all but one small-tile compile, which gets 64-bit ones)
    cl_bf16 = [r for r in results if r.kernel == "_pool_fwd_kernel"
               and "/bf16/channels_last" in r.where]
    assert cl_bf16 and all(r.loads.get(".128") or r.loads.get(".64") for r in cl_bf16), table
    assert sum(bool(r.loads.get(".128")) for r in cl_bf16) >= len(cl_bf16) - 2, table


def test_an_unaligned_axis_is_not_required_to_vectorize() -> None:
    """The ImageNet taps in NCHW: H*W = 196 and 49 are not divisible by 16, so those taps go
    to a launch of their own with ALIGNED off (the JIT could not know their rows aligned and
    scalar loads are right: a check that demanded vectors there would fail on correct code),
    while 56x56 = 3136 = 16 * 196 and 28x28 = 784 = 16 * 49 keep vectorized loads."""
    launches = compile_check.training_launches("imagenet224", compile_check.DTYPES["bf16"],
                                               "nchw")
    pooled = [launch for launch in launches if launch.kernel.__name__ == "_pool_fwd_kernel"]
    assert [(x.kwargs["ALIGNED"], x.kwargs["N_TAPS"]) for x in pooled] == \
        [(True, 7), (False, 9)] * 2  # teacher, student
    # channels_last: every C is a multiple of 16, one launch per side
    launches = compile_check.training_launches("imagenet224", compile_check.DTYPES["bf16"],
                                               "channels_last")
    pooled = [launch for launch in launches if launch.kernel.__name__ == "_pool_fwd_kernel"]
    assert [(x.kwargs["ALIGNED"], x.kwargs["N_TAPS"]) for x in pooled] == [(True, 16)] * 2


def test_the_rules_fire_on_real_sass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks read the compiled code, not the launch: the unaligned NCHW pool compile has
    scalar loads, so claiming its axis aligned (in the launch record only: the compile keeps
    ALIGNED off) must fail, and so must a register budget below what ptxas allocated."""
    launch = [launch for launch in
              compile_check.training_launches("imagenet224", compile_check.DTYPES["bf16"], "nchw")
              if launch.kernel.__name__ == "_pool_fwd_kernel"][-1]
    assert not launch.kwargs["ALIGNED"]
    key, build = compile_check.compile_for(launch, "90")
    monkeypatch.setattr(compile_check, "compile_for", lambda launch, arch: (key, build))
    launch.kwargs["ALIGNED"] = True
    monkeypatch.setattr(compile_check, "MAX_REGISTERS", 8)
    results: dict = {}
    compile_check.check(results, launch, "90", "test")
    (result,) = results.values()
    assert result.registers > 8 and result.loads.get(".<=32")
    assert any("no vectorized" in p for p in result.problems), result.problems
    assert any("registers >" in p for p in result.problems), result.problems


def test_the_tile_variants_compile_too() -> None:
    """--tile-variants: the pool launches of each alternative tile `kernels.bench --tiles`
    measures (here ImageNet at 160 px, bf16 channels_last, sm_90) compile within the same
    budget, and each variant is compiled, not only the default."""
    results = compile_check.run_checks(["imagenet160"], ["bf16"], ["channels_last"], ["90"],
                                       tile_variants=True)
    table = compile_check.format_table(results)
    assert not [r for r in results if r.problems], table
    variants = {r.where.split("/")[3] for r in results if r.where.count("/") == 3}
    assert variants == {"64x64 for all", "small taps apart"}, table
    # the small taps' launch has a tile of its own (5x5: 32 positions x 128 channels)
    tiles = {(x.kwargs["BLOCK_HW"], x.kwargs["BLOCK_C"])
             for name, x in compile_check.variant_launches("imagenet160", torch.bfloat16,
                                                           "channels_last")
             if name == "small taps apart" and x.kernel.__name__ == "_pool_fwd_kernel"}
    assert tiles == {(128, 32), (32, 128)}


def test_every_option_has_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        compile_check.main(["--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0
    for option, words in {"--configs": "tap structures", "--dtypes": "dtypes of the taps",
                          "--layouts": "memory formats", "--archs": "CUDA compute"}.items():
        pattern = rf"{option} [A-Z]+\s+" + r"\s+".join(words.split())
        assert re.search(pattern, text), (option, text)
