"""python -m kernels.host_instructions: the child makes the calls it is told to (kernels
stubbed, CPU tensors), the table is the difference of the counted runs per call, and a
machine without valgrind gets one line."""

from __future__ import annotations

import pytest

from kernels import host_instructions, plan


def test_the_child_makes_each_part_s_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    host_ms = plan.host_ms

    def counted(loss, make_inputs, reps):
        made.append(reps + 1)  # host_ms makes reps + 1 calls
        return host_ms(loss, make_inputs, reps)

    monkeypatch.setattr(plan, "host_ms", counted)
    host_instructions.run_calls("cifar-b128", {"loss": 2, "narrow": 4, "op": 3, "floor": 2})
    assert made == [2, 4, 3, 2]  # loss, at C / 16, op alone, the no-op floor (host_ms too)


def test_the_table_is_instructions_per_call_beyond_the_base_run(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # a fake callgrind: 7e9 for the imports, then 2.5e6 / 2.0e6 / 1.5e6 / 0.75e6 per call
    per_call = {"loss": 2.5e6, "narrow": 2.0e6, "op": 1.5e6, "floor": 0.75e6}
    runs = []

    def fake_count(config_name: str, calls: dict[str, int]) -> int:
        runs.append((config_name, dict(calls)))
        return int(7e9 + sum(per_call[part] * n for part, n in calls.items()))

    monkeypatch.setattr(host_instructions, "count", fake_count)
    monkeypatch.setattr(host_instructions.shutil, "which", lambda name: "/usr/bin/" + name)
    assert host_instructions.main(["--configs", "imagenet160-b256", "--calls", "40"]) == 0
    base = dict.fromkeys(host_instructions.PARTS, host_instructions.BASE_CALLS)
    assert sorted(runs, key=str) == sorted(
        [("imagenet160-b256", base)] + [("imagenet160-b256", {**base, part: base[part] + 40})
                                        for part in host_instructions.PARTS], key=str)
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row == ["imagenet160-b256", "2.500", "M", "2.000", "M", "1.500", "M", "0.750", "M"]


def test_without_valgrind_one_line(monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(host_instructions.shutil, "which", lambda name: None)
    assert host_instructions.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernels.host_instructions: error: valgrind is not installed")
    assert err.count("\n") == 1
