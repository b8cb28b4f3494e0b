"""The tiltflow command: `demo --fast` end to end, the other subcommands on its run folders, flags
that map one to one onto the config dataclasses, and user errors that exit with code 2."""

import json
import math
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
import torch

from tiltflow import cli, rewards, toy2d
from tiltflow import tracking as tilt_tracking
from tiltflow.methods.finetune import FinetuneConfig
from tiltflow.methods.pretrain import PretrainConfig

RUNS = ("expected", "cvar-left", "cvar-right")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One `tiltflow demo --fast` (about 20 s on one thread), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    try:
        assert cli.main(["demo", "--fast", "--out", str(out), "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_demo_fast_writes_runs_plots_and_a_finite_summary(demo):
    expected_files = ["config.json", "summary.json"]
    if _has_matplotlib():
        expected_files += ["samples.png", "reward_hist.png", "pre/samples.png"]
        expected_files += [f"{r}/{f}" for r in RUNS for f in ("before_after.png", "training.png", "reward_hist.png")]
    expected_files += [f"{r}/{f}" for r in ("pre", *RUNS) for f in ("model.safetensors", "metrics.json",
                                                                     "config.json", "log.jsonl")]
    expected_files += ["cvar-left/stage1.json", "cvar-right/stage1.json"]
    for f in expected_files:
        assert (demo / f).is_file() and (demo / f).stat().st_size > 0, f

    metrics = json.loads((demo / "expected" / "metrics.json").read_text())
    assert {"base", "finetuned", "config"} <= set(metrics["evaluation"])


def test_demo_summary_json_is_the_printed_table(demo):
    """summary.json holds the table the demo prints: one row per model (base, the three runs, the
    exact tilt) with reward mean, left/right CVaR₁₀, KL, diversity and, where the closed-form
    target is the model's, the energy distance to it; plus the command line and the settings."""
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["command"].startswith("tiltflow demo --fast --out ")
    assert summary["settings"]["pretrain_iters"] == cli.FAST["pretrain_iters"]
    assert "pretrain_steps" not in summary["settings"]           # deprecated aliases are not settings
    assert summary["wall_s"] > 0
    assert set(summary["models"]) == {"base", *RUNS, "exact tilt"}
    for name, stats in summary["models"].items():
        for key in ("reward_mean", "cvar_left", "cvar_right", "kl", "diversity"):
            assert math.isfinite(stats[key]), (name, key)
        # the mean of a sample lies between the means of its bottom and top 10 %
        assert stats["cvar_left"] <= stats["reward_mean"] <= stats["cvar_right"]
    models, exact = summary["models"], summary["exact_tilt"]
    assert models["base"]["kl"] == 0.0
    assert models["exact tilt"]["kl"] == exact["kl"]
    assert models["expected"]["energy_distance"] == exact["energy_distance_finetuned"]
    assert models["base"]["energy_distance"] == exact["energy_distance_base"]
    assert models["cvar-left"]["energy_distance"] is None and models["cvar-right"]["energy_distance"] is None
    metrics = json.loads((demo / "cvar-left" / "metrics.json").read_text())["evaluation"]["finetuned"]
    assert models["cvar-left"]["cvar_left"] == metrics["reward_cvar_left_10"]


def test_exact_tilt_kl_matches_monte_carlo():
    # KL(p*‖p) = E_p*[r]/λ − log E_p e^{r/λ} (closed form) vs E_p*[log p* − log p] on 200k samples;
    # the Monte Carlo standard error is about std(log p* − log p)/√n ≈ 0.003, so 0.02 is ~6 s.e.
    task, reward, lam = toy2d.get_task("mixture"), rewards.get_reward("linear"), 1.0
    tilt = task.tilt_linear(reward.a, lam)
    y = tilt.sample(200_000, generator=torch.Generator().manual_seed(0)).double()
    mc = float((tilt.log_prob(y) - task.log_prob(y)).mean())
    assert cli.exact_tilt_kl(task, reward, lam) == pytest.approx(mc, abs=0.02)


def test_sample_writes_npy_and_safetensors_of_the_right_shape(demo, tmp_path, capsys):
    npy = tmp_path / "x.npy"
    assert cli.main(["sample", "--run", str(demo / "pre"), "--n", "37", "--steps", "5", "--out", str(npy)]) == 0
    x = np.load(npy, allow_pickle=False)
    assert x.shape == (37, 2) and np.isfinite(x).all()

    from safetensors.torch import load_file
    st = tmp_path / "x.safetensors"
    assert cli.main(["sample", "--run", str(demo / "expected"), "--n", "11", "--steps", "5", "--sde",
                     "--out", str(st)]) == 0
    assert load_file(str(st))["samples"].shape == (11, 2)
    assert cli.main(["sample", "--run", str(demo / "expected"), "--n", "11", "--steps", "5", "--sde",
                     "--scheme", "heun", "--out", str(st)]) == 0
    assert load_file(str(st))["samples"].shape == (11, 2) and "SDE, heun" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["sample", "--run", str(demo / "pre"), "--sde", "--scheme", "huen"])
    assert "invalid choice: 'huen'" in capsys.readouterr().err

    assert cli.main(["sample", "--run", str(demo / "pre"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "x.pt" in capsys.readouterr().err


def test_evaluate_writes_json_with_distances_and_likelihood(demo, tmp_path):
    out = tmp_path / "ev.json"
    assert cli.main(["evaluate", "--run", str(demo / "pre"), "--reward", "linear", "--n", "300", "--steps", "10",
                     "--n-loglik", "50", "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["task"] == "mixture"   # read from the run folder
    for key in ("energy_distance_to_data", "reward_mean", "data_log_likelihood", "kl_data_model", "diversity"):
        assert math.isfinite(ev[key]), key


@pytest.mark.parametrize("argv, bad", [
    (["pretrain", "--task", "nosuchtask", "--iters", "1"], "nosuchtask"),
    (["finetune", "--run", "{pre}", "--reward", "nosuchreward", "--iters", "1"], "nosuchreward"),
    (["finetune", "--run", "{missing}", "--iters", "1"], "missing-run"),
    (["finetune", "--run", "{empty}", "--iters", "1"], "model.safetensors"),
    (["sample", "--run", "{missing}", "--out", "{tmp}/x.npy"], "missing-run"),
    (["evaluate", "--run", "{pre}", "--task", "nosuchtask"], "nosuchtask"),
    (["finetune", "--run", "{pre}", "--objective", "cvar", "--level", "1.5", "--iters", "1"], "1.5"),
    (["demo", "--fast", "--lam", "-1"], "lam"),
    (["demo", "--fast", "--task", "nosuchtask"], "nosuchtask"),
    (["digits", "--per-digit", "1"], "per_digit"),
    (["molecules", "--objective", "best"], "objective"),
])
def test_user_errors_exit_2_with_a_one_line_message(demo, tmp_path, capsys, argv, bad):
    (tmp_path / "empty").mkdir()
    paths = {"pre": demo / "pre", "missing": tmp_path / "missing-run", "empty": tmp_path / "empty", "tmp": tmp_path}
    argv = [a.format(**paths) for a in argv] + ["--no-progress"]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert bad in err and "Traceback" not in err and err.strip().count("\n") == 0


def test_flags_map_one_to_one_onto_the_config_dataclasses():
    p = cli.build_parser()
    args = p.parse_args(["pretrain"])
    assert cli.config_from(args, PretrainConfig) == cli.config_dict(PretrainConfig())
    args = p.parse_args(["finetune", "--run", "r", "--n-loss-times", "8", "--residual-hidden", "16,16"])
    assert cli.config_from(args, FinetuneConfig) == cli.config_dict(FinetuneConfig(n_loss_times=8,
                                                                                   residual_hidden=(16, 16)))
    args = p.parse_args(["demo", "--iters", "7"])
    assert args.iters == 7 and all(getattr(args, f.name) is None for f in fields(cli.DemoConfig) if f.name != "iters")


def _deprecated_fields(cls) -> dict:
    return {f.name: f.metadata["deprecated"] for f in fields(cls) if "deprecated" in f.metadata}


@pytest.mark.parametrize("command, cls", [("demo", "DemoConfig"), ("molecules", "MoleculesConfig"),
                                          ("digits", "DigitsConfig"), ("pretrain", PretrainConfig)])
def test_deprecated_fields_are_hidden_flags_that_still_work(command, cls, capsys):
    """A field with metadata {"deprecated": new} gets a flag missing from --help; given, it sets the
    new field (the config warns naming the new spelling), and both at odds is an error."""
    cls = getattr(cli, cls) if isinstance(cls, str) else cls
    renames = _deprecated_fields(cls)
    if not renames:
        pytest.skip(f"{cls.__name__} has no deprecated fields in this version")
    p = cli.build_parser()
    with pytest.raises(SystemExit):
        p.parse_args([command, "--help"])
    shown = capsys.readouterr().out
    for old, new in renames.items():
        assert "--" + new.replace("_", "-") in shown and "--" + old.replace("_", "-") + " " not in shown
        args = p.parse_args([command, "--" + old.replace("_", "-"), "7"])
        given = {k: v for k, v in cli.config_from(args, cls).items() if v is not None}
        with pytest.warns(DeprecationWarning, match="--" + new.replace("_", "-")):
            cfg = cli.flags.build(cls, given)
        assert getattr(cfg, new) == 7 and old not in cli.config_dict(cfg)
        with pytest.raises(ValueError, match=new):
            cls(**{old: 7, new: 8})


def test_deprecated_flag_overrides_the_fast_preset_of_its_new_name():
    """`demo --fast --pretrain-steps 3`: the old spelling given on the command line wins over the
    --fast preset of pretrain_iters (not a clash between two spellings)."""
    merged = cli.flags.merge(cli.DemoConfig, cli.FAST, {"pretrain_steps": 3})
    with pytest.warns(DeprecationWarning, match="--pretrain-iters"):
        assert cli.flags.build(cli.DemoConfig, merged).pretrain_iters == 3
    assert cli.flags.build(cli.DemoConfig, cli.flags.merge(cli.DemoConfig, cli.FAST, {})).pretrain_iters == 400


@pytest.mark.parametrize("bad, match", [(dict(lam=0.0), "lam"), (dict(level=1.5), "level"), (dict(iters=0), "iters"),
                                        (dict(hidden=()), "hidden"), (dict(n_eval=1), "n_eval"),
                                        (dict(reward="nosuch"), "reward"), (dict(steps=2.5), "steps")])
def test_cli_configs_validate_on_construction(bad, match):
    with pytest.raises(ValueError, match=match):
        cli.DemoConfig(**bad)
    with pytest.raises(ValueError, match="n_kl"):
        cli.EvalConfig(n_kl=-1)
    with pytest.raises(ValueError, match="digit"):
        cli.DigitsConfig(digit=10)
    with pytest.raises(ValueError, match="tail"):
        cli.MoleculesConfig(tail="middle")


def test_report_to_is_a_flag_of_every_training_command_and_reaches_the_library(tmp_path, monkeypatch):
    """--report-to {none,tensorboard,wandb} on each training command; pretrain receives it as report_to=."""
    import inspect
    p = cli.build_parser()
    base = {"finetune": ["--run", "r"], "gft": ["--run", "r", "--target", "t.npy"], "fdc": ["--run", "r"],
            "sample-energy": ["--energy", "gmm40"]}
    for command in ("pretrain", "finetune", "gft", "fdc", "sample-energy", "demo", "digits", "molecules"):
        args = p.parse_args([command, *base.get(command, []), "--report-to", "tensorboard"])
        assert args.report_to == "tensorboard", command
        assert p.parse_args([command, *base.get(command, [])]).report_to == "none", command
    with pytest.raises(SystemExit):
        p.parse_args(["pretrain", "--report-to", "mlflow"])
    from tiltflow.methods import pretrain as pretrain_mod
    if "report_to" not in inspect.signature(pretrain_mod.pretrain).parameters:
        pytest.skip("pretrain takes no report_to in this version")
    seen = {}
    real = cli.pretrain.pretrain

    def spy(*a, report_to="none", **k):      # records what the CLI passed, trains without tracking
        seen["report_to"] = report_to
        seen["open"] = getattr(report_to, "active", None)
        return real(*a, **k)
    monkeypatch.setattr(cli.pretrain, "pretrain", spy)
    assert cli.main(["pretrain", "--task", "gaussian", "--iters", "2", "--hidden", "8", "--batch-size", "8",
                     "--out", str(tmp_path / "pre"), "--no-progress", "--report-to", "tensorboard"]) == 0
    # the command's own open tracker of the run folder (it adds its figure, then closes it)
    tracker = seen["report_to"]
    assert isinstance(tracker, tilt_tracking.Tracker) and tracker.report_to == "tensorboard"
    assert seen["open"] is True and not tracker.active


def test_report_to_tensorboard_gets_the_run_its_evaluation_and_its_figures(demo, tmp_path):
    """`finetune --report-to tensorboard`: one TensorBoard folder holds the loop's records (as
    log.jsonl), the command's evaluation ("eval/...") and its three PNG figures, at the last iteration."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--run", str(demo / "pre"), "--iters", "4", "--batch-size", "16", "--steps", "5",
                     "--n-eval", "200", "--eval-steps", "10", "--n-kl", "50", "--out", str(out), "--no-progress",
                     "--report-to", "tensorboard"]) == 0
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.step for e in acc.Scalars("loss")] == [r["iter"] for r in log]
    metrics = json.loads((out / "metrics.json").read_text())["evaluation"]
    (ev,) = acc.Scalars("eval/finetuned/reward_mean")
    assert ev.step == 4 and ev.value == pytest.approx(metrics["finetuned"]["reward_mean"], rel=1e-6)
    if _has_matplotlib():
        images = set(acc.Tags()["images"])
        assert images == {"before_after", "training", "reward_hist"}, images
        assert all(acc.Images(tag)[0].step == 4 for tag in images)


def test_fdc_on_a_rank_other_than_0_writes_nothing(demo, tmp_path, monkeypatch, capsys):
    """Under torchrun only rank 0 writes: with the rank patched to 1, `tiltflow fdc` trains and
    leaves no file behind (no run folder, no cli.json, no plot) and prints no table."""
    from tiltflow import distributed
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    out = tmp_path / "fdc"
    assert cli.main(["fdc", "--run", str(demo / "pre"), "--iters-outer", "1", "--iters", "2", "--batch-size", "8",
                     "--steps", "4", "--n-eval", "8", "--eval-steps", "3", "--n-kl", "4", "--out", str(out),
                     "--no-progress"]) == 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "outer" not in capsys.readouterr().out
    monkeypatch.undo()
    # the same command on rank 0 writes its run folder (the test above can fail)
    assert cli.main(["fdc", "--run", str(demo / "pre"), "--iters-outer", "1", "--iters", "2", "--batch-size", "8",
                     "--steps", "4", "--n-eval", "8", "--eval-steps", "3", "--n-kl", "4", "--out", str(out),
                     "--no-progress"]) == 0
    assert (out / "cli.json").is_file() and (out / "log.jsonl").is_file()


def test_pretrain_resume_continues_to_more_steps(tmp_path):
    out = str(tmp_path / "pre")
    base = ["pretrain", "--task", "gaussian", "--hidden", "16,16", "--batch-size", "32", "--checkpoint-every", "10",
            "--out", out, "--no-progress"]
    assert cli.main(base + ["--iters", "20"]) == 0
    assert cli.main(base + ["--iters", "30", "--resume"]) == 0
    metrics = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert metrics.get("iters", metrics.get("steps")) == 30
    assert (tmp_path / "pre" / "checkpoints" / "step_00000030.json").is_file()


def test_python_dash_m_tiltflow_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "tiltflow", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for cmd in ("pretrain", "finetune", "sample", "evaluate", "demo"):
        assert cmd in res.stdout


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_sample_energy_writes_a_resumable_run_with_samples_and_metrics(tmp_path, capsys):
    """A tiny gmm40 run (2 s; 7 s with a cold matplotlib import): samples.npy of the right shape, finite log Z / ESS in metrics.json, the
    energy's preset prior scale in config.json, and --resume to more iterations continues the same run,
    here spelled with the deprecated per-epoch flags (epochs × batches per epoch = iters), which warn."""
    out = tmp_path / "energy"
    common = ["sample-energy", "--energy", "gmm40", "--batch-size", "32", "--steps", "10", "--hidden", "16,16",
              "--checkpoint-every", "4", "--n-samples", "64", "--n-eval", "64", "--out", str(out), "--no-progress"]
    assert cli.main(common + ["--iters-per-rollout", "2", "--samples-per-rollout", "32", "--iters", "4"]) == 0
    with pytest.warns(DeprecationWarning, match="--epochs is deprecated, use --iters"):
        assert cli.main(common + ["--batches-per-epoch", "2", "--samples-per-epoch", "32", "--epochs", "3",
                                  "--resume"]) == 0
    assert np.load(out / "samples.npy", allow_pickle=False).shape == (64, 2)
    m = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(m[k]) for k in ("log_Z", "ess_fraction", "energy_median", "energy_distance_to_exact"))
    assert m["log_Z_exact"] == 0.0
    assert json.loads((out / "config.json").read_text())["prior_scale"] == 25.0
    assert len((out / "log.jsonl").read_text().splitlines()) == 3
    assert (out / "model.safetensors").is_file()
    if _has_matplotlib():
        assert (out / "samples.png").is_file()
    capsys.readouterr()
    assert cli.main(["sample-energy", "--energy", "lj56", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lj56" in err and err.strip().count("\n") == 0
    args = cli.build_parser().parse_args(["sample-energy", "--energy", "dw4", "--lr", "0.01"])
    assert args.lr == 0.01 and args.iters is None   # unset flags fall back to the energy's presets


def test_molecules_pretrains_finetunes_and_writes_sdf(tmp_path, capsys, monkeypatch):
    """A tiny ethanol run (~5 s): both SDF files with energies and validity flags, summary.json, the
    EGNN in pre/ and ft/; --resume with more iterations continues; a bad SMILES exits 2."""
    pytest.importorskip("rdkit")
    from rdkit import Chem
    monkeypatch.setenv("TILTFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mol"
    argv = ["molecules", "--smiles", "CCO", "--n-conformers", "16", "--pretrain-iters", "20",
            "--pretrain-batch-size", "16", "--hidden", "8,8", "--iters", "2", "--batch-size", "8", "--steps", "4",
            "--n-offline", "32", "--n-samples", "4", "--sample-steps", "4", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    for name in ("base", "finetuned"):
        mols = list(Chem.SDMolSupplier(str(out / f"{name}.sdf"), removeHs=False))
        assert len(mols) == 4 and all(m.GetNumAtoms() == 9 for m in mols)
        assert all(m.HasProp("MMFF94_energy_kcal_mol") and m.HasProp("valid") for m in mols)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == {"data", "base", "finetuned"} and summary["atoms"] == 9
    assert summary["models"]["data"]["rate_valid"] == 1.0
    assert json.loads((out / "config.json").read_text())["objective"] == "cvar"
    assert json.loads((out / "pre" / "config.json").read_text())["network"]["class"] == "EGNNVelocity"
    assert (out / "ft" / "model.safetensors").is_file()
    assert cli.main([*argv[:-3], "--iters", "3", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert len((out / "ft" / "log.jsonl").read_text().splitlines()) >= 1
    capsys.readouterr()
    assert cli.main(["molecules", "--smiles", "not-a-molecule", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not-a-molecule" in err and err.strip().count("\n") == 0
