"""Stage 2, the reward model (InstructGPT section 3.5 "RM"), on preference data labelled by the ground truth.

Preference data (DPO paper section 6.1): for each prompt, K completions sampled from the SFT policy, scored by
VADER; every one of the C(K,2) pairs is labelled by the scores (optionally with Bradley-Terry noise). The RM is the
SFT model's backbone + a scalar head; all K completions of a prompt go through the network once and the loss
averages -log sigma(r_w - r_l) over the prompt's pairs (InstructGPT eq. 1). Finally its bias is shifted so that SFT
samples score 0 on average (InstructGPT: "normalized so that the labeler demonstrations achieve a mean score of 0").

With a labeler pool (`labelers.n > 1`, `labelers.py`) the training pairs are relabelled by simulated labelers of
unequal reliability and aggregated; with the "weighted" aggregation each pair carries a soft label q and the loss is
`soft_reward_model_loss`. `samples_from` reuses an earlier run's samples, so label sources compare on the same data.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from einops import rearrange

from axon_shared.seed import seed_everything
from axon_shared.training import Trainer, bf16_autocast

from .config import RewardConfig, SamplingConfig
from .data import collate, split_prompts
from .labeler import VaderLabeler, bradley_terry_labels, pearson
from .labelers import apply_pool
from .losses import reward_model_loss, soft_reward_model_loss
from .model import ScalarHeadModel, already_trained, last_index, load_policy, save_model, tokenizer_of
from .rollout import decode_texts, sample_completions


def build_preferences(policy, tokenizer, prompts, k: int, sampling: SamplingConfig, bt_temperature: float, seed: int) -> list[dict]:
    """[{"prompt", "completions" (K), "texts", "scores" (VADER), "pairs" [(winner, loser), ...]}] per prompt."""
    labeler = VaderLabeler()
    repeated = [p for p in prompts for _ in range(k)]
    completions = sample_completions(policy, repeated, sampling, tokenizer.eos_id)
    texts = decode_texts(tokenizer, repeated, completions)
    scores = labeler(texts)
    g = torch.Generator().manual_seed(seed)
    records = []
    for i, prompt in enumerate(prompts):
        sl = slice(i * k, (i + 1) * k)
        s = scores[sl]
        pairs = []
        for a, b in itertools.combinations(range(k), 2):
            if s[a] == s[b] and bt_temperature <= 0:
                continue  # a tie carries no preference
            a_wins = bool(bradley_terry_labels(torch.tensor(s[a]), torch.tensor(s[b]), bt_temperature, g))
            pairs.append((a, b) if a_wins else (b, a))
        records.append({"prompt": list(prompt), "completions": completions[sl], "texts": texts[sl], "scores": s, "pairs": pairs})
    return records


def reused_samples(path: Path, n: int) -> list[dict]:
    """The first n records of an earlier run's preference file, with their ground-truth pairs (a pool's "truth_pairs"
    if that run had one), so that several label sources can be compared on the very same completions."""
    records = read_jsonl(path)
    if len(records) < n:
        raise ValueError(f"{path} holds {len(records)} prompts, fewer than the {n} asked for; lower num_prompts / num_valid_prompts")
    keep = ("prompt", "completions", "texts", "scores")
    return [{**{key: r[key] for key in keep}, "pairs": r.get("truth_pairs", r["pairs"])} for r in records[:n]]


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no preference data at {path}; run `instructgpt-rlhf reward` first (it samples and labels them)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rm_scores(rm: ScalarHeadModel, records: list[dict]) -> torch.Tensor:
    """(N, K) reward-model scores of every completion of every record (one forward over the N*K sequences)."""
    prompts = [r["prompt"] for r in records for _ in r["completions"]]
    completions = [c for r in records for c in r["completions"]]
    batch = collate(prompts, completions)
    values = rm(batch.tokens, batch.attention_mask)  # (N*K, T) through forward, so a DDP wrapper sees the call
    scores = values.gather(1, last_index(batch.attention_mask)[:, None])  # read at each sequence's last real token
    return rearrange(scores, "(n k) 1 -> n k", n=len(records))  # the K completions of each record


@torch.no_grad()
def pair_accuracy(rm: ScalarHeadModel, records: list[dict]) -> dict:
    """Held-out accuracy on every untied pair judged by the true scores, and corr(RM, VADER) over completions."""
    correct = total = 0
    all_rm, all_gt = [], []
    for start in range(0, len(records), 16):
        chunk = records[start : start + 16]
        scores = rm_scores(rm, chunk)
        for r, row in zip(chunk, scores):
            for a, b in itertools.combinations(range(len(r["scores"])), 2):
                if r["scores"][a] == r["scores"][b]:
                    continue
                total += 1
                correct += int((row[a] > row[b]) == (r["scores"][a] > r["scores"][b]))
            all_rm += row.tolist()
            all_gt += r["scores"]
    return {"accuracy": correct / max(total, 1), "pairs": total, "rm_vs_truth_pearson": pearson(all_rm, all_gt)}


def run_reward(cfg: RewardConfig) -> Path:
    tc = cfg.train
    out_dir = Path(tc.out_dir)
    final = out_dir / "reward.safetensors"
    if already_trained(final, "reward"):
        return out_dir
    with Trainer(tc, cfg, name="reward", frozen=("sft", "k", "labelers")) as trainer:
        policy = load_policy(cfg.sft).eval()
        tokenizer = tokenizer_of(cfg.sft)
        s = cfg.sampling
        files = {
            "train": (out_dir / "preferences_train.jsonl", cfg.num_prompts),
            "valid": (out_dir / "preferences_valid.jsonl", cfg.num_valid_prompts),
        }
        data = {}
        with trainer.main_first():  # rank 0 samples and labels the preferences; the others read its files
            for split, (path, n) in files.items():
                if not path.exists():
                    if cfg.samples_from:  # the same samples and truth labels as an earlier run (relabelled below)
                        records = reused_samples(Path(cfg.samples_from) / path.name, n)
                    else:
                        prompts = split_prompts(
                            tokenizer, split, n, seed=tc.seed, min_tokens=s.min_prompt_tokens, max_tokens=s.max_prompt_tokens
                        )
                        with bf16_autocast(trainer.device, tc.bf16):
                            records = build_preferences(policy, tokenizer, prompts, cfg.k, s, cfg.bt_temperature, tc.seed)
                    if split == "train" and cfg.labelers.n > 1:  # the pool relabels the training pairs; valid keeps the truth
                        records, summary = apply_pool(records, cfg.labelers)
                        (out_dir / "labelers.json").write_text(json.dumps(summary, indent=2))
                    write_jsonl(path, records)
                    print(
                        f"reward: {'relabelled' if cfg.samples_from else 'sampled and labelled'} {len(records)} x {len(records[0]['completions'])} completions -> {path}"
                    )
                data[split] = read_jsonl(path)
        train = [r for r in data["train"] if r["pairs"]]
        valid = data["valid"]
        seed_everything(tc.seed)  # the scalar head starts from the seed, whatever sampling drew
        rm = ScalarHeadModel.from_policy(policy)
        del policy

        def batch(step: int, micro: int) -> list[dict]:
            return [train[i] for i in trainer.batch_indices(len(train), step, micro)]

        def loss(rm: ScalarHeadModel, chunk: list[dict]) -> tuple[torch.Tensor, dict]:
            scores = rm_scores(rm, chunk)  # (B, K): K completions per prompt in one pass
            rows = torch.tensor([i for i, r in enumerate(chunk) for _ in r["pairs"]])
            win = torch.tensor([w for r in chunk for w, _ in r["pairs"]])
            lose = torch.tensor([lo for r in chunk for _, lo in r["pairs"]])
            chosen, rejected = scores[rows, win], scores[rows, lose]
            if "targets" in chunk[0]:  # a labeler pool's soft labels (aggregation "weighted")
                targets = torch.tensor([q for r in chunk for q in r["targets"]])
                return soft_reward_model_loss(chosen, rejected, targets), {"accuracy": float((chosen > rejected).float().mean())}
            return reward_model_loss(chosen, rejected), {
                "accuracy": float((chosen > rejected).float().mean())
            }  # mean over the C(K,2) pairs

        metrics = trainer.fit(
            rm,
            loss=loss,
            batch=batch,
            evaluate=lambda rm, step: pair_accuracy(rm, valid),
            schedule=tc.schedule(),
            count=len,
            unit="samples",
            plots={"loss.png": ("train/loss", "train/accuracy", "valid/accuracy")},
        )
        # bias normalisation: SFT samples (the completions of the first 256 training records) score 0 on average; one
        # mean over every score (a mean of chunk means would over-weight a short last chunk)
        with torch.no_grad():
            rm.eval()
            scores = torch.cat([rm_scores(rm, train[i : i + 16]).flatten() for i in range(0, min(len(train), 256), 16)])
            shift = float(scores.mean())
            rm.head.bias -= shift
        metrics = {**metrics, "bias_shift": shift}
        if trainer.is_main:
            save_model(final, rm, "reward", tokenizer.path, metrics=metrics)
    return out_dir
