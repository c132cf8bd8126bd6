"""The labeler pool (`labelers.py`, after Yamagata et al. 2021): the simulation's votes against each labeler's
reliability, the EM's fixed point written out by hand and its recovery of the reliabilities, the three aggregations,
the soft-label RM loss, the config's errors, and the reward stage trained on a pool's soft labels (with n = 1
leaving the preferences exactly as the ground-truth labeller wrote them)."""

import json
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from axon_shared.checkpoint import load_checkpoint
from axon_shared.config import ConfigError
from axon_shared.tokenizer import load_tokenizer
from axon_shared.training import batch_indices
from instructgpt_rlhf import labelers
from instructgpt_rlhf import reward as reward_module
from instructgpt_rlhf.config import LabelerConfig, PipelineConfig, RewardConfig
from instructgpt_rlhf.losses import reward_model_loss, soft_reward_model_loss
from instructgpt_rlhf.model import save_model

from .conftest import tiny_llama
from .test_wiring import random_records, write_jsonl


def truth_records(n: int, k: int = 4) -> list[dict]:
    """n records whose truth is 'the lower index wins': all C(k,2) pairs (a, b), a < b."""
    return [{"pairs": [[a, b] for a in range(k) for b in range(a + 1, k)]} for _ in range(n)]


def test_simulated_votes_agree_with_the_truth_at_each_labelers_reliability():
    """Each labeler's share of votes for the true winner is within 4 binomial standard errors of its c_k (fixed
    seeds: deterministic); the adversaries are round(F n) labelers with c < 0.5, the honest ones c in [low, high];
    every prompt is voted on by per_prompt distinct labelers, each voting once on each of its pairs. Catches
    c and 1 - c swapped, adversaries that do not flip, and a labeler voting twice."""
    pool = labelers.draw_pool(10, 0.3, 0.6, 0.95, seed=3)
    assert pool.adversarial.sum() == 3
    assert (pool.reliability[pool.adversarial] < 0.5).all() and (pool.reliability[pool.adversarial] >= 0.05).all()
    assert ((pool.reliability[~pool.adversarial] >= 0.6) & (pool.reliability[~pool.adversarial] <= 0.95)).all()
    records = truth_records(4000)
    votes = labelers.simulate_votes(records, pool, per_prompt=3, seed=3)
    agree, total = np.zeros(10), np.zeros(10)
    for r, rv in zip(records, votes):
        voters = {k for _, _, k in rv}
        assert len(voters) == 3 and len(rv) == 3 * len(r["pairs"])
        for w, lo, k in rv:
            assert {w, lo} in [set(p) for p in r["pairs"]]
            agree[k] += w < lo
            total[k] += 1
    c = pool.reliability
    se = np.sqrt(c * (1 - c) / total)
    assert (np.abs(agree / total - c) < 4 * se).all(), (agree / total, c)
    assert total.min() > 3000


def by_hand_e_step(votes_per_pair, c, prior=0.5):
    """q = P(a > b | votes) by Bayes' rule written as a product: prior * prod_k c_k^[v=a] (1 - c_k)^[v=b], normalised."""
    out = []
    for votes in votes_per_pair:
        like_a, like_b = prior, 1 - prior
        for k, v in votes:
            like_a *= c[k] if v else 1 - c[k]
            like_b *= 1 - c[k] if v else c[k]
        out.append(like_a / (like_a + like_b))
    return np.array(out)


def test_em_fixed_point_is_the_e_and_m_steps_written_out():
    """At convergence the EM's (c, q) satisfy both steps computed here element by element: q_p from Bayes' rule with
    the prior pi_p and the returned c (a product, not the code's log-odds sum), and c_k = (sum over k's votes of the
    posterior that the vote is right + alpha - 1) / (n_k + alpha + beta - 2). Small random data with a non-uniform
    prior. Catches a wrong sign in the log-odds, a dropped prior, and the Beta pseudo-counts left out or swapped."""
    rng = np.random.default_rng(0)
    n_pairs, n_lab, alpha, beta = 60, 5, 3.0, 1.5
    pair_id, labeler, v = [], [], []
    for p in range(n_pairs):
        for k in rng.permutation(n_lab)[:3]:
            pair_id.append(p)
            labeler.append(k)
            v.append(float(rng.random() < (0.8 if k != 4 else 0.2)))
    pair_id, labeler, v = np.array(pair_id), np.array(labeler), np.array(v)
    prior = rng.uniform(0.2, 0.8, n_pairs)
    c, q = labelers.em_posteriors(pair_id, labeler, v, n_lab, prior_logit=np.log(prior / (1 - prior)), alpha=alpha, beta=beta, tol=1e-12)
    per_pair = [[(labeler[i], v[i]) for i in range(len(v)) if pair_id[i] == p] for p in range(n_pairs)]
    expected_q = np.array([by_hand_e_step([votes], c, prior[p])[0] for p, votes in enumerate(per_pair)])
    assert np.abs(q - expected_q).max() < 1e-9
    expected_c = []
    for k in range(n_lab):
        mine = [i for i in range(len(v)) if labeler[i] == k]
        right = sum(q[pair_id[i]] if v[i] else 1 - q[pair_id[i]] for i in mine)
        expected_c.append((right + alpha - 1) / (len(mine) + alpha + beta - 2))
    assert np.abs(c - np.array(expected_c)).max() < 1e-6
    assert c[4] < 0.5 < c[:4].min()  # the one that mostly disagrees with the others is found


@pytest.mark.parametrize("adversarial", [0.0, 0.45])
def test_em_recovers_reliabilities_and_beats_majority_vote(adversarial):
    """On simulated votes with known truth (20 labelers, 3 per prompt, 1500 prompts of 6 pairs), the EM's
    reliabilities correlate > 0.9 with the true ones, flag exactly the adversaries (c < 0.5), and its labels agree
    with the truth more often than majority vote's; with 45% adversaries by a wide margin (> 0.2), since majority
    vote cannot tell who flips. Naive pooling's label accuracy is the mean reliability of the votes."""
    cfg = LabelerConfig(n=20, per_prompt=3, adversarial=adversarial, seed=1)
    records = truth_records(1500)
    out, summary = labelers.apply_pool(records, cfg)
    pool = labelers.draw_pool(20, adversarial, 0.6, 0.95, seed=1)
    assert summary["reliability"] == pool.reliability.tolist()
    est = np.array(summary["estimated"])
    assert np.corrcoef(est, pool.reliability)[0, 1] > 0.9
    assert ((est < 0.5) == pool.adversarial).all()
    assert summary["adversaries_flagged"] == summary["adversaries"] == round(20 * adversarial)
    weighted, majority = summary["label_accuracy/weighted"], summary["label_accuracy/majority"]
    assert weighted > majority + (0.2 if adversarial else 0.0), summary
    votes = [v for r in out for v in r["votes"]]
    assert abs(summary["label_accuracy/pool"] - sum(w < lo for w, lo, _ in votes) / len(votes)) < 1e-12
    # the records carry what the RM and DPO train on: the posterior's favourite first, with its probability
    assert all(len(r["targets"]) == len(r["pairs"]) and min(r["targets"]) >= 0.5 for r in out)
    assert all(r["truth_pairs"] == rec["pairs"] for r, rec in zip(out, records))
    carried = labelers.label_accuracy(records, [[tuple(p) for p in r["pairs"]] for r in out])
    assert carried == weighted < 1  # the weighted labels, not the hidden truth


def test_majority_and_pool_aggregation_by_hand():
    """Majority vote: the pair goes to the side with more votes, ties dropped; pooling: every vote is a pair."""
    records = [{"pairs": [[0, 1], [0, 2], [1, 2]]}]
    votes = [[[0, 1, 0], [0, 1, 1], [1, 0, 2], [2, 0, 0], [2, 0, 1], [0, 2, 2], [1, 2, 0], [2, 1, 1]]]
    pairs, targets, c = labelers.aggregate(records, votes, "majority", 3)
    assert pairs == [[(0, 1), (2, 0)]] and targets is None and c is None  # (1, 2) is a 1-1 tie: dropped
    pairs, _, _ = labelers.aggregate(records, votes, "pool", 3)
    assert pairs == [[(w, lo) for w, lo, _ in votes[0]]]
    assert labelers.label_accuracy(records, [[(0, 1), (2, 0)]]) == 0.5


def test_soft_reward_model_loss():
    """With hard labels q = 1 it equals `reward_model_loss`; with soft ones the cross-entropy written out,
    -mean [q log sigma(d) + (1 - q) log sigma(-d)]; its minimum over d is at d = logit q."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, generator=g), torch.randn(7, generator=g)
    assert_close(soft_reward_model_loss(a, b, torch.ones(7)), reward_model_loss(a, b), atol=1e-7, rtol=0)
    q = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.6, 0.99, 0.55])
    d = (a - b).double()
    by_hand = -sum(
        float(qi) * math.log(1 / (1 + math.exp(-di))) + (1 - float(qi)) * math.log(1 / (1 + math.exp(di))) for qi, di in zip(q, d)
    )
    assert abs(float(soft_reward_model_loss(a, b, q)) - by_hand / 7) < 1e-6
    d = torch.zeros(1, requires_grad=True)
    soft_reward_model_loss(d, torch.zeros(1), torch.tensor([0.8])).backward()
    assert_close(d.grad, torch.tensor([0.5 - 0.8]), atol=1e-7, rtol=0)  # d loss / d d = sigma(d) - q, 0 at d = logit q


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(n=0), "n"),
        (dict(n=1, adversarial=0.1), "adversarial"),
        (dict(n=10, adversarial=0.5), "adversarial"),
        (dict(n=4, per_prompt=5), "per_prompt"),
        (dict(n=4, reliability_low=0.4), "reliability_low"),
        (dict(n=4, reliability_low=0.8, reliability_high=0.7), "reliability_high"),
        (dict(n=4, aggregation="median"), "aggregation"),
        (dict(n=4, prior_alpha=0.5), "prior_alpha"),
        (dict(n=4, prior_beta=0), "prior_beta"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"LabelerConfig\.{field}="):
        LabelerConfig(**kwargs)
    with pytest.raises(ConfigError, match=rf"LabelerConfig\.{field}="):  # nested, as the CLI builds it
        RewardConfig.from_dict({"labelers": kwargs})


def test_pipeline_labelers_reach_the_reward_stage(monkeypatch, tmp_path):
    """`pipeline --labelers.n K --labelers.adversarial F` hands its labelers section to the reward stage."""
    from instructgpt_rlhf import pipeline

    seen = {}
    monkeypatch.setattr(pipeline, "pretrain", lambda cfg: "pretrained")
    monkeypatch.setattr(pipeline, "run_sft", lambda cfg: None)

    def fake_reward(cfg):
        seen["labelers"] = cfg.labelers
        raise RuntimeError("stop")

    monkeypatch.setattr(pipeline, "run_reward", fake_reward)
    cfg = PipelineConfig.from_preset("tiny", out_dir=str(tmp_path), labelers={"n": 7, "adversarial": 0.3, "aggregation": "majority"})
    with pytest.raises(RuntimeError, match="stop"):
        pipeline.run_pipeline(cfg)
    assert seen["labelers"] == LabelerConfig(n=7, adversarial=0.3, aggregation="majority")


@pytest.fixture
def sft_dir(tiny_base, tmp_path):
    tokenizer_path = tiny_base / "tokenizer.model"
    model = tiny_llama(load_tokenizer(tokenizer_path).vocab_size, seed=5)
    save_model(tmp_path / "sft" / "policy.safetensors", model, "policy", tokenizer_path)
    return tmp_path / "sft"


def test_single_labeler_leaves_the_preferences_as_they_were(sft_dir, tmp_path):
    """n = 1 (the default) is the ground-truth labeller: `apply_pool` returns the very records, and the reward stage
    reusing another run's samples writes the same preference records it read (no votes, no targets)."""
    records = random_records(8, 3, 50, 2, 1, 0, tie_every=3)
    assert labelers.apply_pool(records, LabelerConfig())[0] is records
    tokenizer = load_tokenizer(sft_dir / "tokenizer.model")
    src = tmp_path / "src"
    write_jsonl(src / "preferences_train.jsonl", random_records(16, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 2))
    write_jsonl(src / "preferences_valid.jsonl", random_records(8, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 3))
    out = tmp_path / "reward"
    reward_module.run_reward(
        RewardConfig.from_preset("tiny", sft=str(sft_dir), samples_from=str(src), train={"out_dir": str(out), "steps": 1})
    )
    for split in ("train", "valid"):
        assert reward_module.read_jsonl(out / f"preferences_{split}.jsonl") == reward_module.read_jsonl(src / f"preferences_{split}.jsonl")
    assert not (out / "labelers.json").exists()


def test_reward_stage_trains_on_the_pools_soft_labels(sft_dir, tmp_path, monkeypatch):
    """With a pool (aggregation "weighted") the reward stage relabels the reused samples' training pairs (valid keeps
    the truth), writes labelers.json, and every training step's loss is `soft_reward_model_loss` with the targets of
    the step's records, in the order of their pairs."""
    tokenizer = load_tokenizer(sft_dir / "tokenizer.model")
    src = tmp_path / "src"
    truth = random_records(16, 4, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 2)
    write_jsonl(src / "preferences_train.jsonl", truth)
    write_jsonl(src / "preferences_valid.jsonl", random_records(8, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 3))
    seen = []
    real = reward_module.soft_reward_model_loss
    monkeypatch.setattr(reward_module, "soft_reward_model_loss", lambda a, b, q: seen.append(q.clone()) or real(a, b, q))
    monkeypatch.setattr(reward_module, "reward_model_loss", None)  # must not be called
    out = tmp_path / "reward"
    cfg = RewardConfig.from_preset(
        "tiny", sft=str(sft_dir), samples_from=str(src), labelers={"n": 5, "adversarial": 0.2}, train={"out_dir": str(out)}
    )
    reward_module.run_reward(cfg)
    train = reward_module.read_jsonl(out / "preferences_train.jsonl")
    assert [r["truth_pairs"] for r in train] == [[list(p) for p in r["pairs"]] for r in truth]
    assert all("votes" in r and len(r["targets"]) == len(r["pairs"]) for r in train)
    assert reward_module.read_jsonl(out / "preferences_valid.jsonl") == reward_module.read_jsonl(src / "preferences_valid.jsonl")
    summary = json.loads((out / "labelers.json").read_text())
    assert summary["adversaries"] == 1 and len(summary["estimated"]) == 5
    assert len(seen) == cfg.train.steps
    for step, q in enumerate(seen):
        chunk = [train[i] for i in batch_indices(len(train), cfg.train.batch_size, step, cfg.train.seed)]
        assert_close(q, torch.tensor([t for r in chunk for t in r["targets"]]), atol=0, rtol=0)


def test_reward_model_prior_enters_the_posterior_with_the_right_orientation():
    """The joint model: with a reward model's scores r the EM's prior is pi_p = sigma(r_a - r_b) for the pair (a, b).
    Scores that agree with the truth (a lower index is better here) by a margin of 2 nats per rank raise the weighted
    labels' accuracy over votes alone; the same scores negated lower it. A pair with one vote gets exactly
    q = sigma(r_a - r_b + (2v - 1) logit c) (the E-step with that prior)."""
    records = truth_records(300)
    pool = labelers.draw_pool(12, 0.45, 0.6, 0.95, seed=2)
    votes = labelers.simulate_votes(records, pool, per_prompt=1, seed=2)  # one vote per pair: the prior matters
    good = [[-2.0 * i for i in range(4)] for _ in records]
    bad = [[2.0 * i for i in range(4)] for _ in records]
    accuracy = {}
    for name, scores in (("votes", None), ("good", good), ("bad", bad)):
        pairs, targets, c = labelers.aggregate(records, votes, "weighted", 12, rm_scores=scores)
        accuracy[name] = labelers.label_accuracy(records, pairs)
    assert accuracy["good"] > accuracy["votes"] + 0.02 and accuracy["bad"] < accuracy["votes"] - 0.02, accuracy
    pairs, targets, c = labelers.aggregate(records, votes, "weighted", 12, rm_scores=good)
    (w, lo, k) = votes[0][0]
    a, b = min(w, lo), max(w, lo)
    q_a = by_hand_e_step([[(k, w == a)]], c, prior=1 / (1 + math.exp(-(good[0][a] - good[0][b]))))[0]
    index = [tuple(p) for p in pairs[0]].index((a, b) if q_a >= 0.5 else (b, a))
    assert abs(targets[0][index] - max(q_a, 1 - q_a)) < 1e-9


def test_perfect_labelers_train_the_plain_reward_model(sft_dir, tmp_path):
    """A pool whose labelers are all perfect (reliability 1, no adversaries) aggregated by the EM gives back the
    ground-truth pairs with targets 1, and the reward stage then trains the same reward model as the single
    ground-truth labeller: the weighting changes nothing when there is nothing to correct."""
    tokenizer = load_tokenizer(sft_dir / "tokenizer.model")
    src = tmp_path / "src"
    truth = random_records(16, 4, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 2, tie_every=5)
    write_jsonl(src / "preferences_train.jsonl", truth)
    write_jsonl(src / "preferences_valid.jsonl", random_records(8, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 3))
    runs = {}
    for name, pool in (
        ("plain", {}),
        ("weighted", {"n": 5, "reliability_low": 1.0, "reliability_high": 1.0, "prior_alpha": 1.0, "prior_beta": 1.0}),
    ):
        out = tmp_path / name
        cfg = RewardConfig.from_preset("tiny", sft=str(sft_dir), samples_from=str(src), labelers=pool, train={"out_dir": str(out)})
        reward_module.run_reward(cfg)
        runs[name] = out
    train = reward_module.read_jsonl(runs["weighted"] / "preferences_train.jsonl")
    assert [r["pairs"] for r in train] == [r["pairs"] for r in reward_module.read_jsonl(src / "preferences_train.jsonl")]
    assert min(t for r in train for t in r["targets"]) > 1 - 1e-6
    plain = load_checkpoint(runs["plain"] / "reward.safetensors").tensors["model"]
    weighted = load_checkpoint(runs["weighted"] / "reward.safetensors").tensors["model"]
    assert plain.keys() == weighted.keys()
    for key in plain:
        assert_close(weighted[key], plain[key], atol=1e-5, rtol=0, msg=key)
