"""Feedback from many labelers of unequal reliability (Yamagata et al. 2021), measured on the CPU pipeline's samples.

All runs relabel the very same completions: the training and held-out records of an earlier reward run (`--source`,
the `cpu` pipeline's reward stage: 6 SFT samples per prompt, scored by VADER). For each seed and fraction of
adversarial labelers, a pool of `--n` labelers (3 per prompt, honest reliability U[0.6, 0.95], adversaries 1 - that)
votes on the first `--prompts` training prompts' pairs, and a reward model is trained on the votes aggregated by
majority vote, naive pooling and EM reliability weighting (plus, per seed, one on the ground truth itself); each is
scored by its held-out pair accuracy against VADER on the 256 valid prompts. A second, training-free table runs the
EM alone on larger, sparser pools. Every run is `instructgpt-rlhf reward --samples_from ...` (the command is printed);
rerunning the script trains only what is missing, and `--downstream` adds PPO and DPO on the naive and weighted RMs.

    python instructgpt_rlhf/experiments/labeler_pool.py --source runs/instructgpt_rlhf/cpu \\
        --out runs/instructgpt_rlhf/labelers --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from instructgpt_rlhf.config import DPOConfig, EvaluateConfig, LabelerConfig, PPOConfig, RewardConfig
from instructgpt_rlhf.labelers import apply_pool
from instructgpt_rlhf.reward import reused_samples, run_reward

FRACTIONS = (0.0, 0.1, 0.3, 0.45)
METHODS = ("majority", "pool", "weighted")


def reward_overrides(args, seed: int, fraction: float | None, method: str | None, out_dir: Path) -> dict:
    labelers = {} if method is None else {"n": args.n, "per_prompt": 3, "adversarial": fraction, "aggregation": method, "seed": seed}
    return dict(
        sft=str(Path(args.source) / "sft"),
        samples_from=str(Path(args.source) / "reward"),
        num_prompts=args.prompts,
        labelers=labelers,
        train=dict(
            out_dir=str(out_dir),
            steps=args.steps,
            warmup_steps=20,
            seed=seed,
            max_minutes=None,
            eval_every=args.steps,
            checkpoint_every=args.steps,
            progress=False,
        ),
    )


def cli_command(overrides: dict) -> str:
    flags = []

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        else:
            flags.append(f"--{prefix[:-1]} {json.dumps(value)}")

    walk("", overrides)
    return "instructgpt-rlhf reward " + " ".join(flags)


def train_rms(args) -> list[dict]:
    rows = []
    plan = [(seed, f, m) for f in args.fractions for seed in args.seeds for m in METHODS]  # fraction by fraction, both seeds
    plan += [(seed, None, None) for seed in args.seeds]  # the ground truth itself (n = 1)
    for seed, fraction, method in plan:
        name = f"truth-seed{seed}" if method is None else f"adv{fraction:g}-{method}-seed{seed}"
        out_dir = Path(args.out) / name
        overrides = reward_overrides(args, seed, fraction, method, out_dir)
        t0 = time.time()
        if not (out_dir / "reward.safetensors").exists():
            print(cli_command(overrides), flush=True)
        run_reward(RewardConfig.from_preset("cpu", **overrides))
        metrics = json.loads((out_dir / "reward_metrics.json").read_text())
        summary = json.loads((out_dir / "labelers.json").read_text()) if (out_dir / "labelers.json").exists() else {}
        row = {
            "name": name,
            "seed": seed,
            "fraction": fraction,
            "method": method or "truth",
            "accuracy": metrics["valid/accuracy"],
            "rm_vs_truth": metrics["valid/rm_vs_truth_pearson"],
            "label_accuracy": summary.get(f"label_accuracy/{method}", 1.0),
            "reliability_pearson": summary.get("reliability_pearson"),
            "adversaries": summary.get("adversaries"),
            "adversaries_flagged": summary.get("adversaries_flagged"),
            "honest_flagged": summary.get("honest_flagged"),
            "minutes": metrics.get("minutes"),
        }
        rows.append(row)
        print(
            f"{name}: RM held-out accuracy {row['accuracy']:.4f}, labels {row['label_accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True
        )
        (Path(args.out) / "results.json").write_text(json.dumps(rows, indent=2))
    return rows


def joint_round(args, rm_rows: list[dict]) -> list[dict]:
    """One more E-step/M-step round of the joint model for each weighted run: the EM rerun on the same votes with the
    prior pi_p = sigma(r_a - r_b) from the RM trained on its soft labels (no RM retraining): label accuracy and
    reliability correlation against the votes-only EM's."""
    import torch

    from instructgpt_rlhf.labelers import aggregate, draw_pool, label_accuracy
    from instructgpt_rlhf.model import load_scalar_model
    from instructgpt_rlhf.reward import read_jsonl, rm_scores

    out = []
    for row in rm_rows:
        if row["method"] != "weighted":
            continue
        run = Path(args.out) / row["name"]
        records = read_jsonl(run / "preferences_train.jsonl")
        truth = [{"pairs": r["truth_pairs"]} for r in records]
        votes = [r["votes"] for r in records]
        rm = load_scalar_model(run).eval()
        with torch.no_grad():
            scores = torch.cat([rm_scores(rm, records[i : i + 64]) for i in range(0, len(records), 64)]).tolist()
        pairs, _, c = aggregate(truth, votes, "weighted", args.n, rm_scores=scores)
        pool = draw_pool(args.n, row["fraction"], 0.6, 0.95, row["seed"])
        out.append(
            {
                "fraction": row["fraction"],
                "seed": row["seed"],
                "label_accuracy_votes_only": row["label_accuracy"],
                "label_accuracy_joint": label_accuracy(truth, pairs),
                "reliability_pearson_votes_only": row["reliability_pearson"],
                "reliability_pearson_joint": float(np.corrcoef(c, pool.reliability)[0, 1]),
                "flagged_joint": int(((c < 0.5) & pool.adversarial).sum()),
            }
        )
        print(out[-1], flush=True)
    (Path(args.out) / "joint.json").write_text(json.dumps(out, indent=2))
    return out


def estimation_only(args) -> list[dict]:
    """The EM alone (no RM), pools of n labelers on the first `--prompts` records: estimated vs true reliability."""
    records = reused_samples(Path(args.source) / "reward" / "preferences_train.jsonl", args.prompts)
    rows = []
    for n in (20, 100, 400):
        for fraction in args.fractions:
            for seed in args.seeds:
                _, s = apply_pool(records, LabelerConfig(n=n, per_prompt=3, adversarial=fraction, seed=seed))
                est, true = np.array(s["estimated"]), np.array(s["reliability"])
                rows.append(
                    {
                        "n": n,
                        "fraction": fraction,
                        "seed": seed,
                        "votes_per_labeler": s["pairs/pool"] / n,
                        "pearson": s["reliability_pearson"],
                        "mae": s["reliability_mae"],
                        "adversaries": s["adversaries"],
                        "flagged": s["adversaries_flagged"],
                        "honest_flagged": s["honest_flagged"],
                        "max_abs_error": float(np.abs(est - true).max()),
                        **{m: s[f"label_accuracy/{m}"] for m in METHODS},
                    }
                )
    (Path(args.out) / "estimation.json").write_text(json.dumps(rows, indent=2))
    return rows


def downstream(args) -> list[dict]:
    """PPO (kl 0.5) and DPO (beta 0.1) from the naive (pool) and weighted RMs / pairs at one fraction, then evaluate."""
    from instructgpt_rlhf.dpo import run_dpo
    from instructgpt_rlhf.evaluate import run_evaluate
    from instructgpt_rlhf.ppo import run_ppo

    sft = str(Path(args.source) / "sft")
    results = []
    for seed in args.seeds:
        policies, names = [], []
        for method in ("pool", "weighted"):
            rm = Path(args.out) / f"adv{args.downstream:g}-{method}-seed{seed}"
            ppo_dir, dpo_dir = rm.with_name(rm.name + "-ppo0.5"), rm.with_name(rm.name + "-dpo0.1")
            run_ppo(PPOConfig.from_preset("cpu", sft=sft, reward_model=str(rm), kl_coef=0.5, train={"out_dir": str(ppo_dir), "seed": seed}))
            run_dpo(DPOConfig.from_preset("cpu", sft=sft, preferences=str(rm), beta=0.1, train={"out_dir": str(dpo_dir), "seed": seed}))
            policies += [str(ppo_dir), str(dpo_dir)]
            names += [f"PPO {method}", f"DPO {method}"]
        out = Path(args.out) / f"eval-adv{args.downstream:g}-seed{seed}"
        results.append(
            run_evaluate(EvaluateConfig.from_preset("cpu", sft=sft, reward_model=None, policies=policies, names=names, out_dir=str(out)))
        )
    return results


def mean_and_seeds(values: list[float]) -> str:
    if not values:
        return "not run"
    return f"{statistics.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def tables(rm_rows: list[dict], est_rows: list[dict]) -> str:
    lines = ["| adversarial | " + " | ".join(METHODS) + " | ground truth |", "|---|" + "---|" * (len(METHODS) + 1)]
    truth = [r["accuracy"] for r in rm_rows if r["method"] == "truth"]
    for f in sorted({r["fraction"] for r in rm_rows if r["fraction"] is not None}):
        cells = [mean_and_seeds([r["accuracy"] for r in rm_rows if r["fraction"] == f and r["method"] == m]) for m in METHODS]
        lines.append(f"| {f:.0%} | " + " | ".join(cells) + f" | {mean_and_seeds(truth) if truth else '-'} |")
    lines += ["", "Label accuracy (share of training labels that agree with VADER):", ""]
    lines += ["| adversarial | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for f in sorted({r["fraction"] for r in rm_rows if r["fraction"] is not None}):
        cells = [mean_and_seeds([r["label_accuracy"] for r in rm_rows if r["fraction"] == f and r["method"] == m]) for m in METHODS]
        lines.append(f"| {f:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| labelers | adversarial | votes / labeler | corr(estimated, true) | max abs error | adversaries flagged | honest flagged |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for n in sorted({r["n"] for r in est_rows}):
        for f in sorted({r["fraction"] for r in est_rows}):
            rs = [r for r in est_rows if r["n"] == n and r["fraction"] == f]
            corr = mean_and_seeds([r["pearson"] for r in rs])
            flagged = ", ".join(f"{r['flagged']}/{r['adversaries']}" for r in rs)
            lines.append(
                f"| {n} | {f:.0%} | {rs[0]['votes_per_labeler']:.0f} | {corr} | {max(r['max_abs_error'] for r in rs):.3f} | "
                f"{flagged} | {', '.join(str(r['honest_flagged']) for r in rs)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="runs/instructgpt_rlhf/cpu", help="a pipeline run dir (its sft/ and reward/)")
    parser.add_argument("--out", default="runs/instructgpt_rlhf/labelers")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    parser.add_argument("--n", type=int, default=20, help="labelers in the pool of the RM runs")
    parser.add_argument("--prompts", type=int, default=2560, help="training prompts (their pairs are voted on)")
    parser.add_argument("--steps", type=int, default=320, help="RM steps of 8 prompts (320 x 8 = one pass over 2,560)")
    parser.add_argument("--downstream", type=float, default=None, help="also PPO/DPO from the pool and weighted RMs at this fraction")
    parser.add_argument("--joint", action="store_true", help="rerun each weighted run's EM with its RM as the prior")
    parser.add_argument("--skip_rm", action="store_true", help="only the training-free estimation table")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    est_rows = estimation_only(args)
    rm_rows = [] if args.skip_rm else train_rms(args)
    text = tables(rm_rows, est_rows) if rm_rows else tables([], est_rows)
    (Path(args.out) / "TABLES.md").write_text(text + "\n")
    print(text)
    if args.joint and rm_rows:
        joint_round(args, rm_rows)
    if args.downstream is not None:
        print(json.dumps(downstream(args), indent=2, default=str))


if __name__ == "__main__":
    main()
