"""Hostile and clumsy input: one `error:` line and a non-zero exit on every path, checked
before long work starts; nothing half-written, nothing clobbered, no process-wide state
left behind by library use."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from evoexport.errors import EvoExportError

from .test_reliability import CLI, assert_one_error_line, cli


def _huge_png(path: Path, side: int = 40_000) -> None:
    """A valid PNG header for a side x side image with almost no data: Pillow reads the size
    without decoding, the way a decompression bomb arrives."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("make,msg", [
    (lambda p: np.save(p / "x.npy", np.zeros((0, 3, 56, 56), np.float32)), "shape ['B', 3, 56, 56], got [0, 3, 56, 56]"),
    (lambda p: np.save(p / "x.npy", np.float32(1.0)), "rank 4"),
    (lambda p: np.save(p / "x.npy", np.full((1, 3, 56, 56), np.nan, np.float32)), "NaN or infinite"),
    (lambda p: (p / "x.npy").mkdir(), "is a directory"),
    (lambda p: (p / "x.png").mkdir(), "is a directory"),
    (lambda p: (p / "x.mp4").mkdir(), "is a directory"),
    (lambda p: _huge_png(p / "x.png"), "decodes to more pixels than the 89,478,485 allowed"),
    (lambda p: _huge_png(p / "x.png", 10_000), "decodes to more pixels than the 89,478,485 allowed"),
])
def test_degenerate_inputs(tiny_build, tmp_path, make, msg):
    make(tmp_path)
    inp = next(p for p in tmp_path.iterdir() if p.stem == "x")
    extra = ["--frames", "2"] if inp.suffix == ".mp4" else []
    code, err, _ = cli("run", tiny_build, "--input", inp, "--output", tmp_path / "o.npz", *extra)
    assert_one_error_line(code, err, msg)
    assert not (tmp_path / "o.npz").exists()
    if inp.suffix != ".mp4":
        code, err, _ = cli("show", tiny_build, "--input", inp, "--output", tmp_path / "s.png")
        assert_one_error_line(code, err, msg)


@pytest.mark.parametrize("args,msg", [
    (["run", "{build}", "--input", "{npy}", "--output", "/nonexistent/o.npz"], "folder /nonexistent does not exist"),
    (["run", "{build}", "--input", "{npy}", "--output", "{tmp}"], "is a directory"),
    (["run", "{build}", "--input", "{npy}", "--output", "{tmp}/o.txt"], "must be a .npz file"),
    (["show", "{build}", "--output", "/nonexistent/s.png"], "folder /nonexistent does not exist"),
    (["bench", "{build}", "--json", "/nonexistent/b.json"], "folder /nonexistent does not exist"),
    (["bench", "{build}", "--plot", "/nonexistent/b.png"], "folder /nonexistent does not exist"),
    (["bench", "{build}", "--plot", "{tmp}/b.svg"], "must be a .png file"),
    (["eval", "--model", "dinov2", "--json", "/nonexistent/e.json"], "folder /nonexistent does not exist"),
    (["eval", "--model", "dinov2", "--keep", "1"], "--keep must be in (0, 1)"),
    (["eval", "--model", "dinov2", "--keep", "0"], "--keep must be in (0, 1)"),
    (["run", "{build}", "--input", "{npy}", "--output", "/proc/o.npz"], "cannot write in /proc"),
    (["bench", "{build}", "--iters", "0"], "--iters and --batch must be >= 1"),
    (["bench", "{build}", "--batch", "0"], "--iters and --batch must be >= 1"),
    (["info", "{npy}"], "is a file; give the build directory"),
])
def test_output_paths_and_flags_are_checked_before_work(tiny_build, tmp_path, args, msg):
    """Refused at once: the error comes before any progress line (a bench or eval would
    otherwise run for minutes and then fail to write)."""
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    args = [a.format(build=tiny_build, npy=tmp_path / "x.npy", tmp=tmp_path) for a in args]
    code, err, out = cli(*args)
    assert_one_error_line(code, err, msg)
    assert not [line for line in err if line.startswith("[")], err   # no progress: nothing was started
    assert out == ""


def _edit_manifest(build: Path, edit) -> None:
    m = json.loads((build / "manifest.json").read_text())
    edit(m)
    (build / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.pop("prune_params"), "'prune_params' is a required property"),
    (lambda m: m.pop("preprocess"), "'preprocess' is a required property"),
    (lambda m: m["stages"][0].update(file="../../etc/passwd"), "at $.stages[0].file"),
    (lambda m: m["stages"][0].update(file="/etc/passwd"), "at $.stages[0].file"),
    (lambda m: m["stages"][0]["select"].update(data_file="../w.bin", data_sha256="0" * 64), "at $.stages[0].select"),
    (lambda m: m.update(keep="half"), "at $.keep"),
    (lambda m: m["tower"].update(num_patches=-1), "at $.tower.num_patches"),
    (lambda m: m["inputs"][0].update(shape=[3, 56, 56]), "at $.inputs[0].shape"),
])
@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_a_hostile_manifest_is_refused_by_every_backend(tiny_build, tmp_path, edit, msg, backend):
    """The manifest is input: a missing key or a file outside the build is one error, on the
    backends that open graph files and on the torch backend, which never does."""
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    _edit_manifest(build, edit)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz",
                       "--backend", backend)
    assert_one_error_line(code, err, msg)
    code, err, _ = cli("info", build)
    assert_one_error_line(code, err, msg)


@pytest.mark.parametrize("content,msg", [
    ("{ not json", "engines.json is not valid JSON"),
    ("[1, 2]", "has no list of engines"),
    ('{"engines": [{"name": "stage_0"}]}', "lacks 'file'"),
    ('{"engines": [{"name": "stage_0", "file": "../x.engine", "sha256": "", "onnx_sha256": ""}]}',
     "must be a plain file name"),
])
def test_a_corrupt_engines_json_is_one_error(tiny_build, tmp_path, content, msg):
    build = tmp_path / "b"
    shutil.copytree(tiny_build, build)
    (build / "engines.json").write_text(content)
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 56, 56), np.float32))
    code, err, _ = cli("run", build, "--input", tmp_path / "x.npy", "--output", tmp_path / "o.npz",
                       "--backend", "tensorrt")
    assert_one_error_line(code, err, msg)


def _interrupt_the_swap(monkeypatch) -> list:
    """SIGINT to this process between the two renames of the next folder swap; returns the
    names renamed to, in order."""
    import evoexport.files as files_mod
    real_rename, real_replace_dir, renames = os.rename, files_mod._replace_dir, []

    def rename_then_interrupt(src, dst):
        real_rename(src, dst)
        renames.append(Path(dst).name)
        if len(renames) == 1:             # between the two renames of the swap
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)               # time for another thread to take it and the main one to act on it

    def replace_dir_interrupted(*args):   # only the swap's renames are interrupted
        monkeypatch.setattr(os, "rename", rename_then_interrupt)
        try:
            real_replace_dir(*args)
        finally:
            monkeypatch.setattr(os, "rename", real_rename)

    monkeypatch.setattr(files_mod, "_replace_dir", replace_dir_interrupted)
    return renames


@pytest.mark.parametrize("other_thread", [False, True])
def test_an_interrupt_between_the_swaps_renames_keeps_a_complete_build(tiny_build, tmp_path, monkeypatch, other_thread,
                                                                       sigint_raises):
    """SIGINT right after the old build is moved aside: the signal is held until the new build
    is in place, so the target is never missing and the new build is not deleted. With another
    thread alive (tqdm's monitor, a compiler's workers) the kernel hands the signal to that
    thread when the main one masks it: holding must not depend on which thread receives it."""
    import threading

    import evoexport
    from evoexport.export import build as build_mod
    from evoexport.progress import Progress

    out = tmp_path / "graphs" / "tiny"
    shutil.copytree(tiny_build, out)
    renames = _interrupt_the_swap(monkeypatch)
    stop = threading.Event()
    helper = threading.Thread(target=stop.wait, daemon=True)
    if other_thread:
        helper.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            build_mod.build("llava-tiny", 0.5, seed=7, out=out, validate=False, progress=Progress(enabled=False))
    finally:
        stop.set()
    assert renames[1] == "tiny"                          # the second rename happened before the interrupt
    assert evoexport.load(out).manifest["weights_seed"] == 7   # the new build, complete and verified


def test_the_cli_says_success_once_the_build_is_in_place(tiny_build, tmp_path, monkeypatch, sigint_raises, capsys):
    """The command's outcome is the new build: a Ctrl-C held during the swap (or any later)
    cannot undo it, so the exit status is 0, with a note, and the new build is in place."""
    import evoexport
    from evoexport.cli import main

    out = tmp_path / "graphs" / "tiny"
    shutil.copytree(tiny_build, out)
    renames = _interrupt_the_swap(monkeypatch)
    code = main(["build", "--model", "llava-tiny", "--seed", "7", "--out", str(out), "--no-validate", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: interrupt ignored" in captured.err and "built " in captured.out
    assert renames[1] == "tiny" and evoexport.load(out).manifest["weights_seed"] == 7
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]      # no .old, .partial or lock left


def test_a_ctrl_c_after_the_last_line_is_not_a_failure(tmp_path, sigint_raises):
    """`built ...` is printed, then the process exits at once (no 1-3 s interpreter teardown)
    and a SIGINT in that window leaves the exit status 0."""
    out = tmp_path / "b"
    proc = subprocess.Popen([*CLI, "build", "--model", "llava-tiny", "--out", str(out), "--no-validate", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("built "):
            seen = time.monotonic()
            proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    assert code == 0, proc.stderr.read()
    assert time.monotonic() - seen < 0.5             # it did not linger
    assert (out / "manifest.json").is_file()


def test_two_builds_of_one_folder_the_second_is_refused(tmp_path):
    """A lock beside the target: the second writer is refused at once, naming the first's pid;
    the first completes."""
    out = tmp_path / "b"
    first = subprocess.Popen([*CLI, "build", "--model", "llava-tiny", "--out", str(out), "--no-validate"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in first.stderr:
        if line.startswith("[") and "loading" in line:   # inside the writer's lock
            break
    code, err, _ = cli("build", "--model", "llava-tiny", "--seed", "3", "--out", out, "--no-validate")
    assert_one_error_line(code, err, f"is being written by another process (pid {first.pid})")
    assert first.wait(timeout=120) == 0
    assert json.loads((out / "manifest.json").read_text())["weights_seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_an_interrupted_calibration_fill_is_completed(tmp_path):
    """calib/ filled partly (a fill killed midway): the next use writes what is missing, and
    a leftover partial file is never read as a calibration image."""
    from evoexport.export.calibration import CALIB_PHOTOS, materialize
    from evoexport.export.quantize import calibration_pixels

    folder = tmp_path / "calib"
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(folder / "rocket.png")
    (folder / ".coins.abc.partial.png").write_bytes(b"half a png")
    materialize(folder)
    assert sorted(p.stem for p in folder.glob("[!.]*.png")) == sorted(CALIB_PHOTOS)
    assert calibration_pixels(folder, 56, {"mean": [0.5] * 3, "std": [0.5] * 3}).shape == (len(CALIB_PHOTOS), 3, 56, 56)


def test_cli_main_leaves_no_process_wide_state(tiny_build, capsys):
    """After main(): the caller's signal handlers are back, and an interrupt seen during one
    call does not make every later Progress() raise."""
    from evoexport import progress as progress_mod
    from evoexport.cli import main
    from evoexport.progress import Progress

    def mine(signum, frame):
        pass
    old = signal.signal(signal.SIGINT, mine)
    try:
        progress_mod.mark_interrupted(signal.SIGINT)     # a Ctrl-C seen by an earlier call
        assert main(["info", str(tiny_build)]) == 0      # this call is not interrupted by it
        assert signal.getsignal(signal.SIGINT) is mine
        progress_mod.mark_interrupted(signal.SIGINT)
        assert main(["models"]) == 0
        Progress(enabled=False)("a later step in the same notebook")   # does not raise
    finally:
        signal.signal(signal.SIGINT, old)


def test_reduced_precision_twin_does_not_write_into_the_fp32_stages():
    """The fp16 twin is a deepcopy of the tower; the capture hooks of the fp32 pipeline's
    stages must not come with it."""
    import torch

    from evoexport.models import load_tower
    from evoexport.prune.selection import PruneParams
    from evoexport.prune.schedule import default_schedule
    from evoexport.pipeline.stages import Pipeline

    tower = load_tower("llava-tiny", quiet=True)
    pipe = Pipeline(tower, default_schedule(tower.depth, tower.num_patches, 0.5), PruneParams())
    x = torch.randn(1, 3, 56, 56)
    pipe.run(x)
    probes = [g.module for g in pipe.graphs if g.kind == "encoder" and g.module.probe]
    before = [{k: v.clone() for k, v in s._captured.items()} for s in probes]
    twin = tower.reduced_precision_copy(torch.bfloat16)
    Pipeline(twin, pipe.points, PruneParams()).run(x)
    for stage, was in zip(probes, before):
        assert stage._captured.keys() == was.keys()
        for k in was:
            assert stage._captured[k].dtype == torch.float32 and torch.equal(stage._captured[k], was[k])


def test_library_errors_name_the_problem(tmp_path):
    from evoexport.inputs.image_files import load_image
    with pytest.raises(EvoExportError, match="is a directory"):
        load_image(tmp_path)
