"""fastibd.models.catalog and `python -m fastibd.teachers`: the shipped catalog, downloads
from a local HTTP server (resumed, checked, atomic), verify on a tiny digits model read with
the right and the wrong normalization, and `--teacher.name`."""

from __future__ import annotations

import hashlib
import math
import re
import socket
import sys
import threading
import types
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from fastibd import teachers as command
from fastibd.data.sources import digits_dataset
from fastibd.errors import UserError
from fastibd.models import ARCHITECTURES, build_model, conventional_resolution
from fastibd.models import catalog as catalog_module
from fastibd.models.catalog import CatalogEntry, catalog_entry, fetch, load_catalog
from fastibd.models.checkpoint import atomic_save, model_checkpoint
from fastibd.models.teachers import (
    TeacherSettings,
    check_teacher_accuracy,
    load_checkpoint,
    lowest_plausible_accuracy,
    published_shortfall,
    run_teacher,
    with_catalog,
)
from fastibd.train.settings import load_settings
from tests.conftest import cli_error, data_args

SHIPPED = {"Zhang2019Theoretically", "Wu2020Adversarial", "Wu2020Adversarial_cifar100",
           "Salman2020Do_R50", "resnet50_linf_eps2.0", "resnet50_linf_eps4.0"}


# ---------------------------------------------------------------------- the shipped catalog


def test_every_shipped_entry_parses_and_its_architecture_builds() -> None:
    entries = load_catalog()
    assert SHIPPED <= set(entries)
    for entry in entries.values():
        assert entry.arch in ARCHITECTURES
        with torch.device("meta"):  # full size, no memory: the network the file must fit
            model = build_model(entry.arch, entry.num_classes, entry.normalization)
        classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        assert classifier.out_features == entry.num_classes
        assert model.feature_shapes(conventional_resolution(entry.arch))
        assert entry.clean_acc is not None and entry.accuracy_source  # what verify checks
        assert (entry.url is None) != (entry.robustbench is None)


def test_robustbench_entries_cite_their_own_leaderboard_file() -> None:
    for entry in load_catalog().values():
        if entry.robustbench is not None:
            assert entry.format == "robustbench" and not entry.full_pickle
            assert entry.accuracy_source.endswith(
                f"model_info/{entry.dataset}/{entry.threat_model}/{entry.robustbench.model}.json")
            assert entry.file == (f"{entry.dataset}/{entry.threat_model}/"
                                  f"{entry.robustbench.model}.pt")
        else:  # the robustness library's files are full pickles
            assert entry.full_pickle and entry.format == "robustness"
            assert entry.file == entry.url.rsplit("/", 1)[1]


def test_the_imagenet_recipes_name_the_catalogs_files() -> None:
    for eps in (2, 4):
        path = load_settings(["--cfg", f"imagenet_eps{eps}"]).teacher.path
        entry = catalog_entry(f"resnet50_linf_eps{eps}.0")
        assert path.endswith(entry.file) and entry.eps == f"{eps}/255"


def tiny_entry(**fields) -> dict:
    return {"title": "a test", "dataset": "digits", "num_classes": 10, "arch": "resnet18",
            "format": "fastibd", "normalization": "cifar10", "threat_model": "Linf",
            "eps": "8/255", "url": "http://127.0.0.1:9/tiny.pt", **fields}


def write_catalog(path: Path, **entries: dict) -> Path:
    path.write_text(yaml.safe_dump(entries))
    return path


@pytest.mark.parametrize(("change", "needle"), [
    ({"arch": "wrn99_1"}, "arch 'wrn99_1' is not one of"),
    ({"format": "onnx"}, "format 'onnx'"),
    ({"normalization": "svhn"}, "normalization 'svhn'"),
    ({"eps": "8"}, "eps '8'"),
    ({"num_classes": "ten"}, "num_classes should be int, got 'ten'"),
    ({"sha256": "abc"}, "64 lowercase hex"),
    ({"clean_acc": 85.0}, "accuracy_source"),
    ({"clean_acc": 0.85, "accuracy_source": "x", "robust_acc": 0.5}, "robust_attack"),
    ({"url": None}, "url should be str, got None"),
    ({"checksum": "x"}, "unknown fields checksum"),
])
def test_a_bad_entry_is_one_line_naming_the_field(tmp_path: Path, change: dict,
                                                   needle: str) -> None:
    path = write_catalog(tmp_path / "c.yaml", bad=tiny_entry(**change))
    with pytest.raises(UserError, match=re.escape(needle)) as caught:
        load_catalog(path)
    assert "teacher bad" in str(caught.value) and "\n" not in str(caught.value)


def test_list_and_show(capsys: pytest.CaptureFixture) -> None:
    assert command.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SHIPPED) and "84.92%" in listed
    assert command.main(["show", "Zhang2019Theoretically"]) == 0
    shown = capsys.readouterr().out
    for needle in ("84.92%", "53.08%", "1hPz9QQwyM7QSuWu-ANG_uXR-29xtL8t_", "sha256",
                   "--teacher.name=Zhang2019Theoretically", "cifar10/Linf/"):
        assert needle in shown
    line = cli_error(command.main, ["show", "Zhang2019Theoretical"], capsys)
    assert "did you mean Zhang2019Theoretically" in line and "Salman2020Do_R50" in line


# ---------------------------------------------------------------------------- fetch


class Server:
    """A local HTTP server for one file that honours `Range: bytes=N-`. With `cut_first` it
    closes the connection after half the bytes of its first answer; with `ignore_range` it
    always sends the whole file (200). It records each request's Range header and whether
    `watch` existed when the request came."""

    def __init__(self, data: bytes) -> None:
        self.data, self.cut_first, self.ignore_range = data, False, False
        self.ranges: list[str | None] = []
        self.watch: Path | None = None
        self.watched: list[bool] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/teacher.pt"

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                server.watched.append(server.watch is not None and server.watch.exists())
                found = re.fullmatch(r"bytes=(\d+)-", asked or "")
                start = int(found.group(1)) if found and not server.ignore_range else 0
                body = server.data[start:]
                self.send_response(206 if start else 200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(server.data) - 1}/{len(server.data)}")
                self.end_headers()
                if server.cut_first and len(server.ranges) == 1:
                    body = body[:len(body) // 2]  # then the connection closes
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return Handler


@pytest.fixture
def server() -> Iterator[Server]:
    served = Server(torch.randint(0, 256, (300_001,), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    thread = threading.Thread(target=served.httpd.serve_forever, daemon=True)
    thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()
    thread.join()


def entry_at(url: str, **fields) -> CatalogEntry:
    return CatalogEntry(name="tiny", title="a test", dataset="digits", num_classes=10,
                        arch="resnet18", format="fastibd", normalization="none",
                        threat_model="Linf", eps="8/255", url=url, **fields)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_interrupted_download_resumes_and_lands_atomically(server: Server,
                                                              tmp_path: Path) -> None:
    server.cut_first = True
    server.watch = tmp_path / "to" / "teacher.pt"
    got = fetch(entry_at(server.url, sha256=sha256(server.data), bytes=len(server.data)),
                tmp_path / "to", progress=False)
    half = len(server.data) // 2
    assert server.ranges == [None, f"bytes={half}-"]  # the second request resumed
    assert server.watched == [False, False]  # no file at the final name until it was whole
    assert got.path.read_bytes() == server.data and got.sha256 == sha256(server.data)
    assert not got.already_there and got.bytes == len(server.data)
    # the sha256 it saw is recorded beside the file, sha256sum's way; no partial file is left
    assert sorted(p.name for p in got.path.parent.iterdir()) == ["teacher.pt",
                                                                 "teacher.pt.sha256"]
    assert got.path.with_name("teacher.pt.sha256").read_text() == \
        f"{sha256(server.data)}  teacher.pt\n"
    again = fetch(entry_at(server.url), tmp_path / "to", progress=False)
    assert again.already_there and again.sha256 == got.sha256 and len(server.ranges) == 2


def test_a_part_left_by_an_earlier_run_is_resumed(server: Server, tmp_path: Path) -> None:
    (tmp_path / ".teacher.pt.part").write_bytes(server.data[:1000])
    got = fetch(entry_at(server.url), tmp_path, progress=False)
    assert server.ranges == ["bytes=1000-"] and got.path.read_bytes() == server.data


def test_a_server_that_ignores_the_range_starts_over(server: Server, tmp_path: Path) -> None:
    server.ignore_range = True
    (tmp_path / ".teacher.pt.part").write_bytes(b"stale bytes of some other file")
    got = fetch(entry_at(server.url), tmp_path, progress=False)
    assert server.ranges == ["bytes=30-"] and got.path.read_bytes() == server.data


def test_a_checksum_mismatch_is_refused_and_nothing_kept(server: Server,
                                                         tmp_path: Path) -> None:
    wrong = sha256(b"another file")
    with pytest.raises(UserError, match=f"{sha256(server.data)}, the catalog says {wrong}"):
        fetch(entry_at(server.url, sha256=wrong), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "teacher.pt").write_bytes(server.data)  # a file already there is checked too
    with pytest.raises(UserError, match="is already there but its sha256"):
        fetch(entry_at(server.url, sha256=wrong), tmp_path, progress=False)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_offline_fetch_is_one_line_saying_where_the_file_goes(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{unused_port()}/teacher.pt"  # nothing listens there
    catalog = write_catalog(tmp_path / "c.yaml", tiny=tiny_entry(url=url))
    line = cli_error(command.main, ["--catalog", str(catalog), "fetch", "tiny", "--to",
                                    str(tmp_path / "to"), "--no-progress"], capsys)
    assert f"cannot download tiny from {url}" in line and "refused" in line.lower()
    assert f"put the file at {tmp_path / 'to' / 'teacher.pt'}" in line
    assert "fastibd.teachers verify" in line and not (tmp_path / "to").exists()


def test_robustbench_files_are_fetched_by_robustbench(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    entry = catalog_entry("Zhang2019Theoretically")
    monkeypatch.setitem(sys.modules, "robustbench", None)  # not installed
    with pytest.raises(UserError, match="pip install git\\+https://github.com/RobustBench"):
        fetch(entry, tmp_path, progress=False)
    calls = []

    def load_model(model_name: str, dataset: str, threat_model: str, model_dir: str) -> None:
        calls.append((model_name, dataset, threat_model, model_dir))
        out = Path(model_dir) / dataset / threat_model / f"{model_name}.pt"
        out.parent.mkdir(parents=True)
        out.write_bytes(b"weights")

    utils = types.SimpleNamespace(load_model=load_model)
    monkeypatch.setitem(sys.modules, "robustbench", types.SimpleNamespace(utils=utils))
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    got = fetch(entry, tmp_path, progress=False)
    assert calls == [("Zhang2019Theoretically", "cifar10", "Linf", str(tmp_path))]
    assert got.path == tmp_path / "cifar10/Linf/Zhang2019Theoretically.pt"
    assert got.sha256 == sha256(b"weights")


# ----------------------------------------------------------------- verify, --teacher.name


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet-18 (width 1/16) trained for 3 epochs on the digits with normalization
    cifar10, as a fastibd checkpoint: 93-98% val accuracy over seeds 0-5 (~10% when read
    without it). The learning rate decays to 0: at a constant 1e-2 the eval-mode accuracy
    still swung between 78% and 95% from epoch to epoch, so the CPU's rounding decided it."""
    data = digits_dataset("train")
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(255).contiguous()
    y = torch.from_numpy(data.labels).long()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, "cifar10", 1 / 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    epochs, batch = 3, 64
    decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0,
                                              total_iters=epochs * math.ceil(len(y) / batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            decay.step()
    path = tmp_path_factory.mktemp("teacher") / "tiny.pt"
    return atomic_save(model_checkpoint(model.eval()), path)


@pytest.fixture
def digits_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A catalog of the digits teacher read the right way (cifar10) and the wrong way (none),
    published at 90%: the default catalog for the test, as --teacher.name reads it."""
    published = {"clean_acc": 90.0, "accuracy_source": "this test"}
    path = write_catalog(tmp_path / "c.yaml", right=tiny_entry(**published),
                         wrong=tiny_entry(normalization="none", **published))
    monkeypatch.setattr(catalog_module, "DEFAULT_CATALOG", path)
    return path


def verify_args(teacher: Path, name: str, digits_dir: Path) -> list[str]:
    return ["verify", str(teacher), "--name", name, "--data", str(digits_dir / "val.beton"),
            "--device", "cpu", "--workers", "1"]


def test_verify_accepts_the_right_normalization_and_refuses_the_wrong_one(
        digits_teacher: Path, digits_catalog: Path, digits_dir: Path,
        capsys: pytest.CaptureFixture) -> None:
    assert command.main(verify_args(digits_teacher, "right", digits_dir)) == 0
    out = capsys.readouterr().out
    measured = float(re.search(r"clean +([\d.]+)% of 360 images", out).group(1))
    assert measured > 85 and "published 90.00%, refused below 75.3%" in out
    assert out.rstrip().endswith("ok")
    line = cli_error(command.main, verify_args(digits_teacher, "wrong", digits_dir), capsys)
    wrong = float(re.search(r"gets ([\d.]+)% of 360 images", line).group(1))
    assert wrong < 30 and "wrong is published at 90.00% clean (this test)" in line
    assert "scores at least 75.3% on 360 images" in line and "the catalog's is none" in line
    # the measurement says which normalization the model really reads
    assert re.search(r"with normalization (cifar10|cifar100|imagenet) it gets", line)


def test_verify_checks_the_checksum_and_needs_no_data(digits_teacher: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    digest = hashlib.sha256(digits_teacher.read_bytes()).hexdigest()
    catalog = write_catalog(tmp_path / "c.yaml", same=tiny_entry(sha256=digest),
                            other=tiny_entry(sha256="0" * 64))
    assert command.main(["--catalog", str(catalog), "verify", str(digits_teacher),
                         "--name", "same"]) == 0
    out = capsys.readouterr().out
    assert f"sha256 {digest} (matches the catalog)" in out and "not measured" in out
    line = cli_error(command.main, ["--catalog", str(catalog), "verify", str(digits_teacher),
                                    "--name", "other"], capsys)
    assert f"has sha256 {digest}, not the catalog's {'0' * 64}" in line


def test_teacher_name_fills_the_settings(capsys: pytest.CaptureFixture) -> None:
    filled = with_catalog(TeacherSettings(name="Salman2020Do_R50",
                                          path="models/imagenet/Linf/Salman2020Do_R50.pt"))
    assert (filled.arch, filled.format, filled.normalization) == \
        ("resnet50", "robustbench", "imagenet")
    assert "fetch Salman2020Do_R50 --to models " in filled.source
    assert capsys.readouterr().err == ""
    # an explicit setting keeps its value, and a note says it differs from the catalog's
    mine = with_catalog(TeacherSettings(name="Salman2020Do_R50", normalization="none"))
    assert mine.normalization == "none" and mine.arch == "resnet50"
    assert "teacher.normalization=none overrides the catalog's imagenet" in \
        capsys.readouterr().err
    assert with_catalog(TeacherSettings()) == TeacherSettings()  # no name: nothing filled
    settings = load_settings(["--cfg", "smoke", "--teacher.name=Wu2020Adversarial"]).teacher
    assert settings.name == "Wu2020Adversarial"
    with pytest.raises(UserError, match="teacher.name: expected empty or a teacher in the "
                                        "catalog: Zhang2019Theoretically, ") as caught:
        load_settings(["--cfg", "smoke", "--teacher.name=Wu2020"])
    assert "resnet50_linf_eps4.0" in str(caught.value)


def test_a_named_teacher_loads_as_the_catalog_says(digits_teacher: Path,
                                                    digits_catalog: Path) -> None:
    teacher = run_teacher(TeacherSettings(name="wrong", path=str(digits_teacher)), "ibd", 10)
    assert teacher.spec.normalization == "none" and teacher.spec.arch == "resnet18"
    with pytest.raises(UserError, match="set teacher.path \\(get it with python -m "
                                        "fastibd.teachers fetch right --to DIR"):
        run_teacher(TeacherSettings(name="right"), "ibd", 10)
    with pytest.raises(UserError, match="no teacher checkpoint absent/tiny.pt: python -m "
                                        "fastibd.teachers fetch right --to absent "):
        run_teacher(TeacherSettings(name="right", path="absent/tiny.pt"), "ibd", 10)


def test_the_published_accuracy_threshold() -> None:
    entry = entry_at("http://127.0.0.1:9/x.pt", clean_acc=90.0, accuracy_source="a paper")
    # 10 points below, less 3 standard errors: 90% - 10 - 3 * sqrt(0.9 * 0.1 / 360) = 75.26%
    assert lowest_plausible_accuracy(0.9, 360) == pytest.approx(0.8 - 3 * (0.09 / 360) ** 0.5)
    assert published_shortfall(0.753, 360, entry) is None
    assert "published at 90.00% clean (a paper)" in published_shortfall(0.752, 360, entry)
    assert lowest_plausible_accuracy(0.9, 10 ** 9) == pytest.approx(0.8, abs=1e-4)
    assert published_shortfall(0.01, 360, entry_at("http://127.0.0.1:9/x.pt")) is None


def test_the_start_up_check_compares_with_the_published_accuracy(
        digits_teacher: Path, digits_catalog: Path) -> None:
    data = digits_dataset("val")
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float().div(255)
    batches = [(x, torch.from_numpy(data.labels).long())]
    right = load_checkpoint("resnet18", digits_teacher).model
    check_teacher_accuracy(right, batches, (), 10, "tiny.pt", name="right")
    wrong = load_checkpoint("resnet18", digits_teacher, normalization="none").model
    with pytest.raises(UserError, match="held-out training images right \\(normalization "
                                        "none\\); wrong is published at 90.00%"):
        check_teacher_accuracy(wrong, batches, (), 10, "tiny.pt", name="wrong")


def test_the_trainer_refuses_a_named_teacher_far_below_its_published_accuracy(
        digits_teacher: Path, digits_catalog: Path, digits_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    from fastibd.train import main

    # smoke's student reads raw pixels, so the normalization check has no other to try: the
    # catalog's published figure is what catches the teacher read without its normalization
    code = main(["--cfg", "smoke", *data_args(digits_dir), "--training.device=cpu",
                 f"--training.out_dir={tmp_path / 'run'}", "--teacher.name=wrong",
                 f"--teacher.path={digits_teacher}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    note, line = err.strip().splitlines()  # the loader's note, then the one-line error
    assert "saved with normalization cifar10; using none as asked" in note
    assert line.startswith(f"fastibd.train: error: the teacher {digits_teacher} gets")
    assert "of 200 held-out training" in line
    assert "(normalization none); wrong is published at 90.00% clean" in line
