"""Evaluation (DPO paper section 6.1, Figure 2 left, at our scale): for each policy, on held-out (test-split) prompts,

- the mean ground-truth reward E[VADER(x + y)], y ~ pi(.|x) at temperature 1;
- the sequence-level KL(pi || ref) = E_{y~pi} [log pi(y|x) - log ref(y|x)] (nats per completion), ref = SFT;
- the win rate against the SFT policy by the ground truth (ties count half);
- the reward model's score and its correlation with the ground truth (over-optimisation shows as the RM score
  rising while the truth does not);
- sample completions; and the reward-vs-KL frontier plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import EvaluateConfig, SamplingConfig
from .data import collate, split_prompts
from .labeler import VaderLabeler, pearson
from .model import load_policy, load_scalar_model, tokenizer_of
from .rollout import completion_logprobs, decode_texts, sample_completions


@torch.no_grad()
def measure(policy, ref, tokenizer, prompts, sampling: SamplingConfig, labeler: VaderLabeler, seed: int, rm=None) -> tuple[dict, dict]:
    """Sample one completion per prompt (temperature 1, a fixed seed, torch's RNG state left untouched) and
    return ({reward, kl, length, eos_rate[, rm_score, rm_vs_truth]}, per-sample details)."""
    was_training = policy.training
    policy.eval()
    s = SamplingConfig(**{**sampling.to_dict(), "temperature": 1.0})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        completions = sample_completions(policy, prompts, s, tokenizer.eos_id)
    texts = decode_texts(tokenizer, prompts, completions)
    truth = labeler(texts)
    kl = (completion_logprobs(policy, prompts, completions) - completion_logprobs(ref, prompts, completions)).tolist()
    n = len(prompts)
    metrics = {
        "reward": sum(truth) / n,
        "reward_sem": float(torch.tensor(truth).std() / math.sqrt(n)) if n > 1 else 0.0,
        "kl": sum(kl) / n,
        "length": sum(len(c) for c in completions) / n,
        "eos_rate": sum(1 for c in completions if c and c[-1] == tokenizer.eos_id) / n,
    }
    details = {"completions": completions, "texts": texts, "truth": truth, "kl": kl}
    if rm is not None:
        scores = []
        for start in range(0, n, 64):
            batch = collate(prompts[start : start + 64], completions[start : start + 64])
            scores += rm.score(batch.tokens, batch.attention_mask).tolist()
        metrics["rm_score"] = sum(scores) / n
        metrics["rm_vs_truth"] = pearson(scores, truth)
        details["rm"] = scores
    policy.train(was_training)
    return metrics, details


def win_rate(truth: list[float], baseline: list[float]) -> float:
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(truth, baseline)) / max(len(truth), 1)


def policy_label(path: str) -> str:
    config = Path(path) / "config.json"
    if config.exists():
        c = json.loads(config.read_text())
        if "kl_coef" in c:
            return f"PPO (kl={c['kl_coef']}" + (f", ptx={c['ptx_coef']})" if c.get("ptx_coef") else ")")
        if "beta" in c:
            kind = {"sigmoid": "DPO", "ipo": "IPO"}.get(c.get("loss_type"), "DPO")
            kind = "cDPO" if kind == "DPO" and c.get("label_smoothing") else kind
            return f"{kind} (beta={c['beta']})"
    return Path(path).name


def frontier_plot(rows: list[dict], curves: dict[str, list[tuple[float, float]]], png: Path) -> Path:
    """Reward (VADER) against KL(pi || SFT): final policies as labelled points, training trajectories as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"SFT": "black"}
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            (line,) = ax.plot(xs, ys, alpha=0.35, linewidth=1)
            colors[name] = line.get_color()
    for row in rows:
        marker = "o" if row["name"].startswith("PPO") else "s" if row["name"] != "SFT" else "*"
        ax.errorbar(
            row["kl"],
            row["reward"],
            yerr=row["reward_sem"],
            fmt=marker,
            color=colors.get(row["name"]),
            markersize=8,
            capsize=3,
            label=row["name"],
        )
    ax.set_xlabel("KL(pi || pi_SFT)  [nats per completion]")
    ax.set_ylabel("mean ground-truth reward (VADER compound)")
    ax.set_title("Reward vs KL frontier (held-out prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def training_curve(run_dir: str) -> list[tuple[float, float]]:
    """(eval_kl, eval_reward) points logged during a PPO/DPO run (on valid prompts)."""
    from axon_shared.metrics import read_metrics

    return [
        (r["valid/kl"], r["valid/reward"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "valid/kl" in r and "valid/reward" in r
    ]


def run_evaluate(cfg: EvaluateConfig) -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer_of(cfg.sft)
    ref = load_policy(cfg.sft).eval()
    rm = load_scalar_model(cfg.reward_model).eval() if cfg.reward_model else None
    labeler = VaderLabeler()
    s = cfg.sampling
    prompts = split_prompts(
        tokenizer, "test", cfg.num_prompts, seed=cfg.seed, min_tokens=s.min_prompt_tokens, max_tokens=s.max_prompt_tokens
    )
    rows, samples = [], {}
    base_metrics, base = measure(ref, ref, tokenizer, prompts, s, labeler, seed=cfg.seed, rm=rm)
    labels = list(cfg.names) or [policy_label(p) for p in cfg.policies]
    entries = [("SFT", None)] + list(zip(labels, cfg.policies))
    for name, path in entries:
        if path is None:
            metrics, details = base_metrics, base
        else:
            metrics, details = measure(load_policy(path).eval(), ref, tokenizer, prompts, s, labeler, seed=cfg.seed, rm=rm)
        metrics["win_rate_vs_sft"] = win_rate(details["truth"], base["truth"])
        rows.append({"name": name, "path": path, **metrics})
        samples[name] = [{"text": t, "truth": v} for t, v in list(zip(details["texts"], details["truth"]))[: cfg.num_samples]]
        print(f"evaluate: {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    curves = {name: training_curve(p) for name, p in zip(labels, cfg.policies)}
    frontier_plot(rows, curves, out_dir / "frontier.png")
    result = {"rows": rows, "samples": samples, "num_prompts": len(prompts)}
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "RESULTS.md").write_text(results_markdown(result, image_prefix=""))
    return result


def results_markdown(result: dict, image_prefix: str = "") -> str:
    sft = next(r for r in result["rows"] if r["name"] == "SFT")
    lines = [
        f"Held-out test prompts: {result['num_prompts']} (first 2-8 tokens of test-split movie snippets), one sample each at temperature 1.",
        "",
        "| policy | reward (VADER) | gain over SFT | KL(pi‖SFT) nats | win rate vs SFT | RM score | corr(RM, truth) | length | EOS rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['reward']:.3f} ± {r['reward_sem']:.3f} | {r['reward'] - sft['reward']:+.3f} | {r['kl']:.2f} | {r['win_rate_vs_sft']:.2f} | "
            f"{r.get('rm_score', float('nan')):.2f} | {r.get('rm_vs_truth', float('nan')):.2f} | {r['length']:.1f} | {r['eos_rate']:.2f} |"
        )
    lines += ["", f"![reward vs KL frontier]({image_prefix}frontier.png)", "", "Samples (prompt + completion, VADER score):", ""]
    for name, items in result["samples"].items():
        lines.append(f"- **{name}**")
        for item in items:
            text = item["text"].replace("|", "\\|").replace("\n", " ")
            lines.append(f"  - `{item['truth']:+.2f}` {text}")
    return "\n".join(lines) + "\n"
