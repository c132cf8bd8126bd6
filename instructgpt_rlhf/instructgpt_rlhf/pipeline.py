"""`pipeline`: the whole experiment end to end, each stage skipped when its output exists (so it resumes):

x_llama pretraining on en-text -> SFT on movie snippets -> preferences + reward model
-> PPO at each kl_coef, DPO at each beta -> evaluate (reward/KL frontier, win rates, samples) -> REPORT.md
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from .config import PipelineConfig
from .dpo import run_dpo
from .evaluate import results_markdown, run_evaluate
from .ppo import run_ppo
from .reward import run_reward
from .sft import run_sft


def pretrain(cfg: PipelineConfig) -> str:
    """x_llama pretraining (its TrainConfig preset + overrides) into <out_dir>/pretrain; returns the run dir."""
    if cfg.pretrained:
        return cfg.pretrained
    from x_llama.config import TrainConfig
    from x_llama.train import train

    out = Path(cfg.out_dir) / "pretrain"
    overrides = json.loads(json.dumps(cfg.pretrain_overrides))
    overrides.setdefault("train", {})["out_dir"] = str(out)
    if (out / "DONE").exists():
        return str(out)
    run_dir = train(TrainConfig.from_preset(cfg.pretrain_preset, **overrides))
    (out / "DONE").write_text("ok\n")
    return str(run_dir or out)


def run_pipeline(cfg: PipelineConfig) -> dict:
    root = Path(cfg.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        t0 = time.time()
        out = fn(*args)
        timings[name] = round(time.time() - t0, 1)
        print(f"pipeline: {name} done in {timings[name]:.0f} s")
        (root / "timings.json").write_text(json.dumps(timings, indent=2))
        return out

    image_prefix = f"{root.name}/" if root.parent.name == "demo" else ""
    pretrained = timed("pretrain", pretrain, cfg)
    sft_dir = str(root / "sft")
    timed("sft", run_sft, cfg.sft.replace(pretrained=pretrained, train={"out_dir": sft_dir}))
    rm_dir = str(root / "reward")
    timed("reward", run_reward, cfg.reward.replace(sft=sft_dir, labelers=cfg.labelers.to_dict(), train={"out_dir": rm_dir}))
    policies = []
    for kl in cfg.kl_coefs:
        d = str(root / f"ppo_kl{kl:g}")
        timed(f"ppo_kl{kl:g}", run_ppo, cfg.ppo.replace(sft=sft_dir, reward_model=rm_dir, kl_coef=kl, train={"out_dir": d}))
        policies.append(d)
    for beta in cfg.betas:
        d = str(root / f"dpo_beta{beta:g}")
        timed(f"dpo_beta{beta:g}", run_dpo, cfg.dpo.replace(sft=sft_dir, preferences=rm_dir, beta=beta, train={"out_dir": d}))
        policies.append(d)
    result = timed(
        "evaluate",
        run_evaluate,
        cfg.evaluate.replace(sft=sft_dir, reward_model=rm_dir, policies=list(policies), out_dir=str(root / "eval")),
    )
    plots = stage_plots(root, policies)
    write_report(root, result, timings, image_prefix=image_prefix, plots=plots)
    return result


def stage_plots(root: Path, policies: list[str]) -> list[Path]:
    """Training curves of every stage as PNGs in <root>/plots (paths relative to root)."""
    from axon_shared.metrics import plot_metrics

    wanted = {
        "sft": ["train/loss", "valid/loss"],
        "reward": ["train/loss", "train/accuracy", "valid/accuracy", "valid/rm_vs_truth_pearson"],
    }
    for p in policies:
        name = Path(p).name
        ppo = ["train/score", "train/reward", "train/kl", "train/entropy", "train/clipfrac", "train/value_error"]
        wanted[name] = ppo if name.startswith("ppo") else ["train/loss", "train/margin", "valid/accuracy", "valid/reward", "valid/kl"]
    out = []
    for name, keys in wanted.items():
        metrics = root / name / "metrics.jsonl"
        if metrics.exists():
            with contextlib.suppress(ValueError):  # no rows for these keys
                out.append(plot_metrics(metrics, root / "plots" / f"{name}.png", keys, title=name).relative_to(root))
    return out


def write_report(root: Path, result: dict, timings: dict, image_prefix: str, plots: list[Path] = (), title: bool = True) -> Path:
    rm = json.loads((root / "reward" / "reward_metrics.json").read_text()) if (root / "reward" / "reward_metrics.json").exists() else {}
    lines = ["## Training language models from human preferences: RLHF (InstructGPT/PPO) and DPO (instructgpt_rlhf)", ""] if title else []
    if rm:
        lines += [
            f"Reward model: held-out pair accuracy **{rm.get('valid/accuracy', float('nan')):.3f}** "
            f"on {rm.get('valid/pairs', 0):.0f} pairs; corr(RM, VADER) {rm.get('valid/rm_vs_truth_pearson', float('nan')):.2f}.",
            "",
        ]
    lines.append(results_markdown(result, image_prefix=image_prefix + "eval/"))
    lines += ["", "Training curves:", ""] + [f"![{p.stem}]({image_prefix}{p.as_posix()})" for p in plots]
    lines += ["", "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()), ""]
    path = root / "REPORT.md"
    path.write_text("\n".join(lines))
    return path
