"""`tiltflow sample` and `tiltflow evaluate`: samples of a finished run's model, and its energy
distance, rewards and likelihoods on fresh ODE samples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint as ckpt
from .. import rewards as rewards_mod
from ..metrics import energy_distance
from ..tasks import toy2d
from .evaluation import EvalConfig, evaluate
from .flags import progress_flags
from .runs import EVAL_SEED_OFFSET, load_model, run_info, writes

DEVICE_HELP = "auto (the GPU when there is one), cpu, cuda, cuda:1, ... (default: auto)"


def cmd_sample(args) -> int:
    out = Path(args.out)
    if out.suffix not in (".npy", ".safetensors"):
        raise ValueError(f"--out must end in .npy or .safetensors (no pickle formats), got {str(out)!r}")
    if not writes():        # sampling trains nothing: under torchrun rank 0 does it alone
        return 0
    model = load_model(args.run, args.device)
    x = model.sample(args.n, steps=args.steps, sde=args.sde, seed=args.seed, scheme=args.scheme).cpu().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        import numpy as np
        np.save(out, x.numpy(), allow_pickle=False)
    else:
        from safetensors.torch import save_file
        save_file({"samples": x}, str(out), metadata={"run": str(args.run), "sde": str(args.sde),
                                                      "scheme": args.scheme if args.sde else "",
                                                      "steps": str(args.steps), "seed": str(args.seed)})
    how = f"SDE, {args.scheme}" if args.sde else "ODE"
    print(f"wrote {tuple(x.shape)} samples ({how}, {args.steps} steps) to {out}")
    return 0


def cmd_evaluate(args) -> int:
    if not writes():        # evaluation trains nothing: under torchrun rank 0 does it alone
        return 0
    model = load_model(args.run, args.device)
    info = run_info(args.run)
    task_name = args.task or info.get("task")
    reward_name = args.reward or info.get("reward")
    task = toy2d.get_task(task_name) if task_name else None
    reward = rewards_mod.get_reward(reward_name) if reward_name else None
    ev = EvalConfig(n_eval=args.n, eval_steps=args.steps, n_kl=0)
    stats, x, _ = evaluate(model, reward, ev, args.seed)
    result = {"run": str(args.run), "task": task_name, "reward": reward_name, "seed": args.seed + EVAL_SEED_OFFSET,
              **stats}
    if task is not None:
        g = torch.Generator().manual_seed(args.seed + EVAL_SEED_OFFSET)
        y, y2 = task.sample(args.n, generator=g), task.sample(args.n, generator=g)
        result["energy_distance_to_data"] = energy_distance(x, y)
        result["energy_distance_noise_floor"] = energy_distance(y2, y)
        if args.n_loglik > 0:
            yl = y[: args.n_loglik].to(model.device)
            ll = model.log_prob(yl, steps=args.steps)
            result["data_log_likelihood"] = float(ll.mean())
            result["data_log_likelihood_n"] = yl.shape[0]
            if hasattr(task, "log_prob"):
                # E_data[log p_data − log p_model] = KL(data ‖ model) ≥ 0
                true_ll = float(task.log_prob(yl.cpu()).double().mean())
                result["data_log_likelihood_true"] = true_ll
                result["kl_data_model"] = true_ll - result["data_log_likelihood"]
    out = Path(args.out) if args.out else Path(args.run) / "evaluation.json"
    ckpt.write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


def add_parsers(sub) -> None:
    tasks, rewards = ", ".join(toy2d.TASKS), ", ".join(rewards_mod.REWARDS)
    s = sub.add_parser("sample", help="draw samples from a run's model",
                       description="Draw samples from the model of --run and save them as .npy or .safetensors.")
    s.add_argument("--run", required=True, help="run folder holding model.safetensors")
    s.add_argument("--n", type=int, default=1000, help="number of samples (default: 1000)")
    s.add_argument("--steps", type=int, default=100, help="integration steps (default: 100)")
    s.add_argument("--sde", action="store_true", help="memoryless SDE instead of the ODE")
    s.add_argument("--scheme", choices=("exponential", "heun"), default="exponential",
                   help="the SDE's step: exponential, or heun (two network calls a step, second order) "
                        "(default: exponential)")
    s.add_argument("--out", default="samples.npy", help="output file, .npy or .safetensors (default: samples.npy)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    progress_flags(s)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="energy distance, rewards and likelihood of a run's model",
                       description="Evaluate the model of --run on fresh ODE samples; prints and writes JSON.")
    s.add_argument("--run", required=True, help="run folder holding model.safetensors")
    s.add_argument("--task", default=None, help=f"task to compare with: {tasks} (default: the run's task)")
    s.add_argument("--reward", default=None, help=f"reward to summarise: {rewards} (default: the run's reward)")
    s.add_argument("--n", type=int, default=2000, help="samples of model and data (default: 2000)")
    s.add_argument("--steps", type=int, default=50, help="ODE steps for samples and likelihoods (default: 50)")
    s.add_argument("--n-loglik", type=int, default=500,
                   help="data points whose log-likelihood is computed; 0 skips (default: 500)")
    s.add_argument("--out", default=None, help="JSON file (default: RUN/evaluation.json)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    progress_flags(s)
    s.set_defaults(func=cmd_evaluate)
