"""tracking: what a Tracker logs is what a reader of its files gets back, and library logging
reaches a user who configured nothing (stderr) as well as one who did (propagation)."""

import contextlib
import io
import logging
import math
import struct
from pathlib import Path

import pytest

from tiltflow.tracking import Tracker, get_logger

RECORDS = [{"iter": 1, "loss": 0.5, "lr": 1e-3, "accepted": True, "note": "x", "tried": [1, 2], "grad_norm": None},
           {"iter": 2, "loss": 0.25, "lr": 1e-3, "accepted": False, "eval": {"kl": 0.125}},
           {"iter": 5, "loss": float("nan"), "lr": 5e-4}]
# the numeric scalars of RECORDS by tag, as (step, value): strings, lists and None are skipped,
# bools are 0/1, nested dicts become "a/b", NaN is kept
EXPECTED = {"iter": [(1, 1.0), (2, 2.0), (5, 5.0)], "loss": [(1, 0.5), (2, 0.25), (5, math.nan)],
            "lr": [(1, 1e-3), (2, 1e-3), (5, 5e-4)], "accepted": [(1, 1.0), (2, 0.0)], "eval/kl": [(2, 0.125)]}


def _same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Steps equal; values equal to float32 precision (TensorBoard stores float32: rel 1e-6), NaN to NaN."""
    return [s for s, _ in got] == [s for s, _ in want] and all(
        (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6) for (_, a), (_, b) in zip(got, want))


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(2, 2), dpi=20)
    ax.plot([0, 1], [0, 1])
    return fig


# ---------------------------------------------------------------- TensorBoard


def test_tensorboard_event_files_hold_the_logged_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    fig = _figure()
    fig.savefig(tmp_path / "grid.png")
    with Tracker("tensorboard", run_dir=tmp_path, name="t", config={"lam": 1.0}) as tr:
        for r in RECORDS:
            tr.log(r, step=r["iter"])
        tr.log_figure("samples", fig, step=5)
        tr.log_figure("grid", tmp_path / "grid.png", step=5)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert set(tags["scalars"]) == set(EXPECTED)
    for tag, want in EXPECTED.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert _same(got, want), (tag, got)
    assert set(tags["images"]) == {"samples", "grid"}
    img = acc.Images("grid")[0]
    assert img.step == 5 and (img.width, img.height) == (40, 40)     # 2 in × 20 dpi
    assert fig.get_axes()                                              # the user's figure is left open


def test_tensorboard_without_run_dir_writes_under_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    with Tracker("tensorboard", name="demo") as tr:
        tr.log({"loss": 1.0}, step=0)
    assert list((tmp_path / "runs" / "tensorboard" / "demo").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------- W&B (offline, no network)


def _wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (run-<id>.wandb): a 7-byte ":W&B" header,
    then LevelDB log framing, 32 KiB blocks of (crc32, length, type) + chunk, a record split
    into FIRST/MIDDLE/LAST chunks across blocks. Read here so the test needs no network."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:            # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk     # FULL/FIRST start a record, MIDDLE/LAST extend it
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def _finished_wandb_log(run_dir: Path, timeout: float = 30.0) -> Path:
    """The transaction log of the one offline run under run_dir, once it holds the run's "exit"
    record: W&B's service flushes the file shortly after run.finish() returns, not before."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        (log,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
        if log.stat().st_size > 7 and any(rec.WhichOneof("record_type") == "exit" for rec in _wandb_records(log)):
            return log
        if time.monotonic() > deadline:
            raise AssertionError(f"{log} holds no exit record {timeout:g} s after the run finished")
        time.sleep(0.1)


def test_wandb_offline_run_holds_the_logged_history(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
                 "WANDB_PROJECT": "tiltflow-test"}.items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    with Tracker("wandb", run_dir=run_dir, name="offline", config={"lam": 2.0, "out": tmp_path}) as tr:
        for r in RECORDS:
            tr.log(r, step=r["iter"])
        tr.log_figure("samples", _figure(), step=5)
    log = _finished_wandb_log(run_dir)
    history, config = {}, {}
    for rec in _wandb_records(log):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for tag, v in row.items():
                history.setdefault(tag, []).append((row["_step"], v))
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
            assert rec.run.project == "tiltflow-test" and rec.run.display_name == "offline"
    for tag, want in EXPECTED.items():
        got = [(s, math.nan if v == "NaN" else float(v)) for s, v in history[tag]]
        assert _same(got, want), (tag, got)
    # the image's history entry (flattened by W&B into samples/<field>) and its file beside the log
    assert history["samples/_type"] == [(5, "image-file")] and history["samples/width"] == [(5, 40)]
    assert (log.parent / "files" / history["samples/path"][0][1]).is_file()
    assert config["lam"] == 2.0 and config["out"] == str(tmp_path)     # as config.json writes a path


# ---------------------------------------------------------------- no-op and errors


def test_bad_report_to_names_the_value():
    with pytest.raises(ValueError, match="'tensorbord'"):
        Tracker("tensorbord")
    with pytest.raises(ValueError, match="'tensorbord'"):
        Tracker("tensorbord", enabled=False)       # every rank fails alike


@pytest.mark.parametrize("report_to", ["tensorboard", "wandb", "none"])
def test_disabled_or_none_writes_nothing(tmp_path, monkeypatch, report_to):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with Tracker(report_to, run_dir=tmp_path / "run", enabled=report_to == "none") as tr:
        tr.log({"loss": 1.0}, step=0)
        tr.log_figure("f", _figure(), step=0)
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'tiltflow\[wandb\]'"):
        Tracker("wandb")


# ---------------------------------------------------------------- logging


@contextlib.contextmanager
def unconfigured_logging():
    """Logging as in a script that configured nothing: no handlers on root or "tiltflow". Entered
    in the test body, because pytest adds its capture handlers to root when the call starts."""
    lib, root = logging.getLogger("tiltflow"), logging.getLogger()
    saved = root.handlers, lib.handlers, lib.level
    root.handlers, lib.handlers = [], []
    lib.setLevel(logging.NOTSET)
    try:
        yield lib
    finally:
        root.handlers, lib.handlers = saved[:2]
        lib.setLevel(saved[2])


def test_get_logger_reaches_stderr_when_nothing_is_configured(capfd):
    with unconfigured_logging() as lib:
        log = get_logger("unit")
        assert log.name == "tiltflow.unit" and get_logger("tiltflow.methods.fdc").name == "tiltflow.methods.fdc"
        log.info("tiltflow unit: lam=1")
        log.debug("hidden")                                # the default level is INFO
        assert capfd.readouterr().err == "tiltflow unit: lam=1\n"
        assert len(lib.handlers) == 1                      # installed once, not per call
        get_logger("other")
        assert len(lib.handlers) == 1


def test_the_default_handler_stands_down_once_the_user_configures_logging(capfd):
    with unconfigured_logging():
        log = get_logger("unit")
        mine = io.StringIO()
        logging.getLogger().addHandler(logging.StreamHandler(mine))
        log.warning("warning: checkpoint corrupt")
        assert capfd.readouterr().err == "" and mine.getvalue() == "warning: checkpoint corrupt\n"   # once


def test_a_configured_user_receives_records_by_propagation(caplog):
    caplog.set_level(logging.INFO, logger="tiltflow")
    get_logger("unit").info("tiltflow unit: config line")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == \
        [("tiltflow.unit", "INFO", "tiltflow unit: config line")]


# ---------------------------------------------------------------- one run, one tracker


def test_a_run_given_an_open_tracker_logs_to_it_and_leaves_it_open(tmp_path, monkeypatch):
    """report_to=<open Tracker>: pretrain logs its records into the caller's W&B run and leaves it
    open, so the caller's figure lands in the same run (one offline run folder, one .wandb log)."""
    pytest.importorskip("wandb")
    import json
    import torch
    import tiltflow as tilt
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(k, v)
    run_dir = tmp_path / "run"
    with Tracker("wandb", run_dir=run_dir, name="caller") as tr:
        tilt.pretrain(torch.randn(64, 2), 100, hidden=(8,), batch_size=16, out=run_dir, progress=False,
                      report_to=tr)
        assert tr.active                                 # not closed by the run
        tr.log_figure("samples", _figure(), step=100)
    assert not tr.active
    log = _finished_wandb_log(run_dir)
    steps = {}
    for rec in _wandb_records(log):
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            for tag in row:
                steps.setdefault(tag, []).append(row["_step"])
    assert steps["loss"] == [50, 100] and steps["samples/_type"] == [100]


def test_open_tracker_owns_what_it_opens_only():
    from tiltflow.tracking import open_tracker, tracked
    mine = Tracker("none")
    assert open_tracker(mine) == (mine, False)
    tr, owned = open_tracker("none")
    assert owned and isinstance(tr, Tracker) and not tr.active
    with pytest.raises(ValueError, match="tensorbord"):
        open_tracker("tensorbord")
    closed = []
    mine.close = lambda: closed.append(1)
    with tracked(mine) as tr:
        assert tr is mine
    assert closed == []                                   # the caller's tracker is left open
