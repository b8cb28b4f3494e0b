"""`tiltflow design` and tasks.design's pipeline: a tiny end-to-end run (pretrain, reward, fine-tune,
RDKit evaluation, SDF) and its user errors."""

import json

import pytest

pytest.importorskip("rdkit")

from tiltflow import cli  # noqa: E402

TINY = ["--pretrain-iters", "2", "--hidden", "8", "--layers", "1", "--pretrain-batch-size", "8",
        "--predictor-iters", "3", "--iters", "1", "--batch-size", "4", "--steps", "3", "--n-loss-times", "1",
        "--n-offline", "8", "--n-samples", "4", "--sample-steps", "3", "--no-progress"]


def test_design_runs_end_to_end_and_writes_its_files(tmp_path):
    out = tmp_path / "d"
    assert cli.main(["design", *TINY, "--out", str(out)]) == 0
    assert json.loads((out / "pre" / "config.json").read_text())["coupling"] == "equivariant"   # the default
    summary = json.loads((out / "summary.json").read_text())
    for name in ("base", "finetuned"):
        m = summary["models"][name]
        assert m["n"] == 4 and 0.0 <= m["validity"] <= 1.0
        assert (out / f"{name}.sdf").is_file()
    assert summary["predictor"]["property"] == "dipole" and "mae" in summary["predictor"]
    assert (out / "pre" / "model.safetensors").is_file() and (out / "ft" / "log.jsonl").is_file()
    # the stored base is fine-tuned again without pretraining (--base)
    assert cli.main(["design", *TINY, "--base", str(out / "pre" / "model.safetensors"), "--objective", "expected",
                     "--reward", "mmff", "--out", str(tmp_path / "e")]) == 0
    assert not (tmp_path / "e" / "pre").exists()


@pytest.mark.parametrize("flags, word", [(["--level", "1.5"], "level"), (["--tail", "up"], "tail"),
                                         (["--reward", "qed"], "reward"), (["--base", "nope.safetensors"], "base"),
                                         (["--pretrain-coupling", "ot"], "pretrain_coupling")])
def test_design_bad_settings_name_the_setting(tmp_path, capsys, flags, word):
    assert cli.main(["design", *TINY, *flags, "--out", str(tmp_path / "x")]) == 2
    assert word in capsys.readouterr().err
