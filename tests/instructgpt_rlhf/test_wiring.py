"""The stages' own code, not only the loss functions it calls, against computations written here: which model the
DPO stage uses as the reference, the pairs the reward stage builds and trains on, its bias shift, the PPO
iteration's missing-EOS penalty and PPO-ptx term, the Bradley-Terry label noise, and the evaluation's KL.

Log-probabilities and reward-model scores are recomputed one sequence at a time, unpadded (no collate, no masks),
so the batch layout of the code under test is not reused to check itself."""

import copy
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from axon_shared.metrics import read_metrics
from axon_shared.tokenizer import load_tokenizer
from axon_shared.training import batch_indices
from instructgpt_rlhf import dpo as dpo_module
from instructgpt_rlhf import ppo as ppo_module
from instructgpt_rlhf import reward as reward_module
from instructgpt_rlhf.config import DPOConfig, PPOConfig, PPOTrain, RewardConfig, SamplingConfig
from instructgpt_rlhf.evaluate import measure, win_rate
from instructgpt_rlhf.losses import AdaptiveKLController, ranked_pairs
from instructgpt_rlhf.model import ScalarHeadModel, load_policy, load_scalar_model, save_model

from .conftest import tiny_llama

EOS, V = 2, 24


def unpadded_logprob(model, prompt, completion) -> float:
    """log p(completion | prompt), float64, from one unpadded forward pass summed token by token."""
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + list(completion)]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(completion))


def unpadded_score(rm, prompt, completion) -> float:
    """r(x, y): the scalar head at the last token of prompt + completion, one unpadded sequence."""
    with torch.no_grad():
        return float(rm(torch.tensor([list(prompt) + list(completion)]))[0, -1])


def random_records(n, k, vocab, eos_id, bos_id, seed, tie_every=0):
    """n prompts with k distinct completions each (ending in EOS), 'true' scores (a tie in every `tie_every`-th record) and
    every untied pair labelled by the scores, as the reward stage writes them to preferences_*.jsonl."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda length: torch.randint(4, vocab, (length,), generator=g).tolist()
    records = []
    for i in range(n):
        completions = []
        while len(completions) < k:  # distinct completions (identical ones would share their true score)
            completion = ids(int(torch.randint(1, 5, (1,), generator=g))) + [eos_id]
            completions += [completion] if completion not in completions else []
        scores = torch.randn(k, generator=g).round(decimals=2).tolist()
        if tie_every and i % tie_every == 0:
            scores[1] = scores[0]
        pairs = [(a, b) if scores[a] > scores[b] else (b, a) for a, b in itertools.combinations(range(k), 2) if scores[a] != scores[b]]
        records.append(
            {"prompt": [bos_id] + ids(2 + i % 3), "completions": completions, "texts": [""] * k, "scores": scores, "pairs": pairs}
        )
    return records


def write_jsonl(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def sft_dir(tiny_base, tmp_path) -> Path:
    """A saved 'SFT policy' (a random tiny Llama) with the shared test tokenizer, as `run_sft` leaves it."""
    tokenizer_path = tiny_base / "tokenizer.model"
    model = tiny_llama(load_tokenizer(tokenizer_path).vocab_size, seed=5)
    save_model(tmp_path / "sft" / "policy.safetensors", model, "policy", tokenizer_path)
    return tmp_path / "sft"


# ------------------------------------------------------------------------------------------------------------- DPO


def test_dpo_stage_reference_is_the_frozen_sft_policy(sft_dir, tmp_path, monkeypatch):
    """`run_dpo` on a few preference pairs, every `dpo_loss` call recorded. DPO (Rafailov et al. 2023, eq. 7) needs
    ref = the SFT policy, frozen: at every step the reference log-probs it passes must equal the SFT model's,
    recomputed here, while the policy's move away from them. At step 0 the policy is the SFT model, so the loss is
    log 2. The held-out margin the stage logs must be beta [(log pi_w - log ref_w) - (log pi_l - log ref_l)] of the
    final policy, computed here, and training must make it positive (the implicit reward's sign, DPO section 5).
    Catches ref = the policy itself, policy and reference swapped, a reference that trains, and chosen/rejected
    swapped."""
    tokenizer = load_tokenizer(sft_dir / "tokenizer.model")
    prefs = tmp_path / "prefs"
    write_jsonl(prefs / "preferences_train.jsonl", random_records(6, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 0))
    write_jsonl(prefs / "preferences_valid.jsonl", random_records(3, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 1))
    calls = []
    real = dpo_module.dpo_loss

    def spy(pc, pr, rc, rr, beta, **kwargs):
        out = real(pc, pr, rc, rr, beta, **kwargs)
        calls.append([x.detach().double().clone() for x in (pc, pr, rc, rr, out[0])])
        return out

    monkeypatch.setattr(dpo_module, "dpo_loss", spy)
    out_dir = tmp_path / "dpo"
    cfg = DPOConfig.from_preset(
        "tiny", sft=str(sft_dir), preferences=str(prefs), eval_prompts=2, train={"out_dir": str(out_dir), "lr": 3e-3}
    )
    dpo_module.run_dpo(cfg)

    sft = load_policy(sft_dir).eval()
    policy = load_policy(out_dir).eval()

    def table(model, pairs):
        return torch.tensor([[unpadded_logprob(model, p, c), unpadded_logprob(model, p, r)] for p, c, r in pairs], dtype=torch.float64)

    train = dpo_module.preference_pairs(reward_module.read_jsonl(prefs / "preferences_train.jsonl"))
    ref_train = table(sft, train)
    assert len(calls) == cfg.train.steps
    for step, (_, _, rc, rr, _) in enumerate(calls):
        rows = batch_indices(len(train), cfg.train.batch_size, step, cfg.train.seed)  # the pairs this step drew
        assert_close(rc, ref_train[rows, 0], atol=1e-4, rtol=0, msg=f"step {step}: reference log pi(chosen)")
        assert_close(rr, ref_train[rows, 1], atol=1e-4, rtol=0, msg=f"step {step}: reference log pi(rejected)")
    pc, pr, rc, rr, loss = calls[0]
    assert_close(torch.stack([pc, pr]), torch.stack([rc, rr]), atol=1e-5, rtol=0)  # step 0: policy == reference
    assert_close(loss, torch.tensor(math.log(2.0), dtype=torch.float64), atol=1e-6, rtol=0)
    pc, pr, rc, rr, _ = calls[-1]
    assert float((torch.stack([pc, pr]) - torch.stack([rc, rr])).abs().max()) > 0.05  # the policy moved

    valid = dpo_module.preference_pairs(reward_module.read_jsonl(prefs / "preferences_valid.jsonl"))
    ref_valid, pol_valid = table(sft, valid), table(policy, valid)
    margin = cfg.beta * ((pol_valid[:, 0] - ref_valid[:, 0]) - (pol_valid[:, 1] - ref_valid[:, 1]))
    logged = {r["step"]: r["valid/margin"] for r in read_metrics(out_dir / "metrics.jsonl") if "valid/margin" in r}
    assert abs(logged[0]) < 1e-6
    assert abs(logged[cfg.train.steps] - float(margin.mean())) < 1e-5
    pol_train = table(policy, train)
    train_margin = cfg.beta * ((pol_train[:, 0] - ref_train[:, 0]) - (pol_train[:, 1] - ref_train[:, 1]))
    assert float(train_margin.mean()) > 0.02, train_margin  # DPO raised the chosen over the rejected


# ------------------------------------------------------------------------------------------------------ reward model


def test_reward_stage_trains_on_the_labelled_pairs_and_centres_the_bias(sft_dir, tmp_path, monkeypatch):
    """`run_reward` on preference files already written (so it samples nothing). Every training step's loss must be
    InstructGPT eq. 1 over the records' own (winner, loser) pairs: the `chosen`/`rejected` scores it passes to
    `reward_model_loss` are checked against the RM scores of those completions, recomputed here unpadded with the RM
    of that step. After training the bias is shifted so that the training completions (samples of the SFT policy)
    score 0 on average (our stand-in for InstructGPT section 3.5's "normalized so that the labeler demonstrations
    achieve a mean score of 0"), checked on the saved model. Catches winners and losers swapped, pairs read from the wrong record, the shift
    added instead of subtracted or computed on other completions."""
    tokenizer = load_tokenizer(sft_dir / "tokenizer.model")
    out_dir = tmp_path / "reward"
    # 16 records: the stage averages chunk means over chunks of 16, which is the plain mean only for full chunks
    train = random_records(16, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 2, tie_every=4)
    write_jsonl(out_dir / "preferences_train.jsonl", train)
    write_jsonl(out_dir / "preferences_valid.jsonl", random_records(4, 3, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.bos_id, 3))
    seen = []
    real_scores, real_loss = reward_module.rm_scores, reward_module.reward_model_loss

    def spy_scores(rm, records):
        out = real_scores(rm, records)
        if torch.is_grad_enabled():  # a training step (evaluation and the bias shift run without gradients)
            by_hand = [[unpadded_score(rm, r["prompt"], c) for c in r["completions"]] for r in records]
            seen.append({"records": records, "by_hand": torch.tensor(by_hand)})
        return out

    def spy_loss(chosen, rejected, margin=None):
        seen[-1]["chosen"], seen[-1]["rejected"] = chosen.detach().clone(), rejected.detach().clone()
        return real_loss(chosen, rejected, margin)

    monkeypatch.setattr(reward_module, "rm_scores", spy_scores)
    monkeypatch.setattr(reward_module, "reward_model_loss", spy_loss)
    cfg = RewardConfig.from_preset("tiny", sft=str(sft_dir), train={"out_dir": str(out_dir), "lr": 3e-3})
    reward_module.run_reward(cfg)

    assert len(seen) == cfg.train.steps
    for step, call in enumerate(seen):
        expected_records = [train[i] for i in batch_indices(len(train), cfg.train.batch_size, step, cfg.train.seed)]
        assert [r["prompt"] for r in call["records"]] == [r["prompt"] for r in expected_records]
        winners = torch.tensor([call["by_hand"][i, w] for i, r in enumerate(expected_records) for w, _ in r["pairs"]])
        losers = torch.tensor([call["by_hand"][i, l] for i, r in enumerate(expected_records) for _, l in r["pairs"]])
        assert_close(call["chosen"], winners, atol=1e-4, rtol=0, msg=f"step {step}: winners")
        assert_close(call["rejected"], losers, atol=1e-4, rtol=0, msg=f"step {step}: losers")

    rm = load_scalar_model(out_dir).eval()
    scores = torch.tensor([unpadded_score(rm, r["prompt"], c) for r in train for c in r["completions"]], dtype=torch.float64)
    shift = json.loads((out_dir / "reward_metrics.json").read_text())["bias_shift"]
    assert abs(shift) > 1e-2  # the untrained head's mean was far from 0: there was something to shift
    assert abs(float(scores.mean())) < 1e-5
    assert float(scores.std()) > 1e-2  # not a constant


def test_pair_accuracy_against_brute_force(tiny_base):
    """`pair_accuracy` (the reward stage's held-out metric) against every ordered pair (w, l) with truth_w > truth_l
    counted by hand, the RM scores recomputed unpadded, and corr(RM, truth) from numpy. 20 records: two chunks."""
    rm = ScalarHeadModel(tiny_llama(V, seed=6).config).eval()
    records = random_records(20, 3, V, EOS, 1, 4, tie_every=3)
    by_hand = [[unpadded_score(rm, r["prompt"], c) for c in r["completions"]] for r in records]
    correct = total = 0
    for r, rm_row in zip(records, by_hand):
        for w, l in itertools.permutations(range(3), 2):
            if r["scores"][w] > r["scores"][l]:
                total += 1
                correct += rm_row[w] > rm_row[l]
    got = reward_module.pair_accuracy(rm, records)
    assert got["pairs"] == total == sum(len(r["pairs"]) for r in records)
    assert abs(got["accuracy"] - correct / total) < 1e-12
    assert abs(correct / total - 0.5) > 0.05  # a flipped comparison would show
    flat_rm, flat_truth = sum(by_hand, []), sum((r["scores"] for r in records), [])
    assert abs(got["rm_vs_truth_pearson"] - np.corrcoef(flat_rm, flat_truth)[0, 1]) < 1e-5


# ------------------------------------------------------------------------------------------------ preference labels


def _fake_sampling(monkeypatch, scores):
    """build_preferences without a policy or VADER: completion i is [i], its text str(i), its score scores[i]."""
    monkeypatch.setattr(reward_module, "sample_completions", lambda policy, prompts, sampling, eos_id: [[i] for i in range(len(prompts))])
    monkeypatch.setattr(reward_module, "decode_texts", lambda tokenizer, prompts, completions: [str(c[0]) for c in completions])

    class Labeler:
        def __call__(self, texts):
            return [scores[int(t)] for t in texts]

    monkeypatch.setattr(reward_module, "VaderLabeler", Labeler)


def test_build_preferences_labels_every_untied_pair_by_the_score(monkeypatch):
    """Without label noise (bt_temperature 0), each record's pairs are exactly the ordered pairs (w, l) with
    score_w > score_l, enumerated here over all K^2 index pairs: C(K,2) of them less the ties, each once, the higher
    score first (the same pairs `losses.ranked_pairs` gives). Catches a dropped or duplicated pair, a tie kept, and
    winner and loser swapped."""
    k = 5
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (40 * k,), generator=g).div(4).tolist()  # few distinct values: many ties
    _fake_sampling(monkeypatch, scores)
    records = reward_module.build_preferences(
        None, SimpleNamespace(eos_id=EOS), [[1, i] for i in range(40)], k, SamplingConfig(), bt_temperature=0.0, seed=0
    )
    assert len(records) == 40
    n_ties = 0
    for i, r in enumerate(records):
        s = scores[i * k : (i + 1) * k]
        assert r["scores"] == s and r["completions"] == [[j] for j in range(i * k, (i + 1) * k)]
        expected = {(w, l) for w in range(k) for l in range(k) if s[w] > s[l]}
        ties = sum(s[a] == s[b] for a in range(k) for b in range(a + 1, k))
        n_ties += ties
        assert len(r["pairs"]) == len(set(map(tuple, r["pairs"]))) == len(expected) == math.comb(k, 2) - ties
        assert set(map(tuple, r["pairs"])) == expected
        _, w, l = ranked_pairs(torch.tensor([s], dtype=torch.float64))
        assert set(zip(w.tolist(), l.tolist())) == expected
    assert n_ties > 20  # the ties case is exercised


def test_build_preferences_bradley_terry_noise_follows_the_sigmoid(monkeypatch):
    """With bt_temperature tau > 0 the simulated annotator prefers y_a with probability sigma((s_a - s_b) / tau)
    (Bradley-Terry, DPO paper eq. 1; `labeler.bradley_terry_labels`), and a tie is kept and decided by a fair coin.
    4000 prompts, each with the scores {0, 0.5, 1, 1} in a random order: the frequency with which the higher score
    wins, per score gap, must be within 4 binomial standard errors of the sigmoid (the draws are seeded, so the test
    is deterministic). Catches the preference reversed (1 - p), the temperature ignored (sigma(0.5) = 0.62 vs
    sigma(1) = 0.73), ties dropped or always given to one side, and the noise switched off."""
    n, k, tau = 4000, 4, 0.5
    g = torch.Generator().manual_seed(1)
    base = torch.tensor([0.0, 0.5, 1.0, 1.0])
    scores = torch.cat([base[torch.randperm(k, generator=g)] for _ in range(n)]).tolist()
    _fake_sampling(monkeypatch, scores)
    records = reward_module.build_preferences(
        None, SimpleNamespace(eos_id=EOS), [[1, i] for i in range(n)], k, SamplingConfig(), bt_temperature=tau, seed=123
    )
    wins: dict[float, list[int]] = {0.5: [], 1.0: [], 0.0: []}
    for r in records:
        s = r["scores"]
        every_pair = {frozenset(p) for p in itertools.combinations(range(k), 2)}
        assert len(r["pairs"]) == math.comb(k, 2) and {frozenset(p) for p in r["pairs"]} == every_pair
        for w, l in r["pairs"]:
            gap = abs(s[w] - s[l])
            wins[gap].append(int(s[w] > s[l]) if gap else int(w < l))  # a tie: does the lower index win?
    for gap, outcomes in wins.items():
        p = 1 / (1 + math.exp(-gap / tau))
        freq, se = sum(outcomes) / len(outcomes), math.sqrt(p * (1 - p) / len(outcomes))
        assert abs(freq - p) < 4 * se, (gap, freq, p, se)
    assert len(wins[1.0]) == 2 * n and len(wins[0.5]) == 3 * n and len(wins[0.0]) == n


# ------------------------------------------------------------------------------------------------------------- PPO


def _ppo_models():
    torch.manual_seed(0)
    policy = tiny_llama(V, seed=0)
    return policy, copy.deepcopy(policy).eval().requires_grad_(False), ScalarHeadModel(policy.config)


def test_missing_eos_penalty_lowers_the_score(monkeypatch):
    """`ppo_iteration` subtracts `missing_eos_penalty` from the score of every completion that never emitted EOS
    before the score enters the rewards (`kl_shaped_rewards`, recorded here), and leaves the others as the score
    function gave them. Catches the penalty's sign flipped, applied to the completions that did stop, or not
    applied."""
    policy, ref, value = _ppo_models()
    seen = {}
    real = ppo_module.kl_shaped_rewards

    def spy(scores, *args, **kwargs):
        seen["scores"] = scores.detach().clone()
        return real(scores, *args, **kwargs)

    monkeypatch.setattr(ppo_module, "kl_shaped_rewards", spy)
    raw = lambda batch, completions: torch.tensor([0.25 * len(c) - 0.5 for c in completions])
    cfg = PPOConfig(
        missing_eos_penalty=0.7,
        ppo_epochs=1,
        minibatch_size=16,
        sampling=SamplingConfig(max_new_tokens=6, batch_size=16),
        train=PPOTrain(batch_size=16),
    )
    prompts = [[1, 3 + i % 5] for i in range(16)]
    torch.manual_seed(0)
    metrics, completions = ppo_module.ppo_iteration(
        policy, ref, value, prompts, raw, cfg, lambda loss: None, AdaptiveKLController(0.05), EOS
    )
    stopped = torch.tensor([c[-1] == EOS for c in completions])
    assert 0 < int(stopped.sum()) < len(completions)  # both kinds in the batch
    score = raw(None, completions)
    assert_close(seen["scores"], torch.where(stopped, score, score - 0.7))
    assert bool((seen["scores"][~stopped] < score[~stopped]).all())
    assert abs(metrics["eos_rate"] - float(stopped.float().mean())) < 1e-9


def test_ptx_loss_is_next_token_cross_entropy_on_pretraining_windows():
    """`ptx_loss` = the pretraining LM loss, -1/(B L) sum log pi(x_{i+1} | x_<=i) over B windows of L + 1 consecutive
    tokens of the pretraining stream (the log pi(x) term of InstructGPT eq. 2), recomputed here window by window
    from unpadded forwards. The windows are the ones ptx_loss draws (torch.randint on the global RNG, as its
    docstring says). Catches targets not shifted by one, windows that are not slices of the stream, a sum instead of
    a mean and a sign error."""
    policy = tiny_llama(V, seed=2).eval()
    stream = torch.randint(3, V, (80,), generator=torch.Generator().manual_seed(0))
    B, L = 3, 10
    torch.manual_seed(7)
    got = ppo_module.ptx_loss(policy, stream, B, L)
    torch.manual_seed(7)
    starts = torch.randint(0, stream.numel() - L - 1, (B,)).tolist()
    nll = 0.0
    for s in starts:
        window = stream[s : s + L + 1].tolist()
        nll -= unpadded_logprob(policy, window[:1], window[1:])  # log pi(x_1..x_L | x_0) = sum_i log pi(x_{i+1} | x_<=i)
    assert_close(got.double(), torch.tensor(nll / (B * L), dtype=torch.float64), atol=1e-5, rtol=0)
    assert float(got.detach()) > 0.5 * math.log(V)  # an untrained model: near log V


def test_ppo_ptx_adds_gamma_times_the_pretraining_loss():
    """PPO-ptx (InstructGPT eq. 2): the objective adds gamma E_{x~D_pretrain}[log pi(x)], so the loss each update
    minimises is the PPO loss + gamma * (pretraining NLL). Two identical iterations, with and without `ptx_fn`
    (no optimizer step, so the parameters stay put): the losses differ by gamma * ptx_fn() and the policy's
    gradients by gamma * its gradient. Catches gamma left out, the sign flipped, and the ptx term detached."""
    policy, ref, value = _ppo_models()
    stream = torch.randint(3, V, (120,), generator=torch.Generator().manual_seed(1))

    def ptx_fn():
        with torch.random.fork_rng():  # the same windows at every call, and the iteration's random draws untouched
            torch.manual_seed(11)
            return ppo_module.ptx_loss(policy, stream, 4, 12)

    gamma = 2.5
    cfg = PPOConfig(
        ptx_coef=gamma,
        ppo_epochs=2,
        minibatch_size=4,
        sampling=SamplingConfig(max_new_tokens=5, batch_size=8),
        train=PPOTrain(batch_size=8),
    )
    prompts = [[1, 3 + i % 5] for i in range(8)]

    def run(ptx):
        losses, grads = [], []

        def update(loss):
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]))
            policy.zero_grad(set_to_none=True)
            value.zero_grad(set_to_none=True)

        torch.manual_seed(0)
        metrics, _ = ppo_module.ppo_iteration(
            policy, ref, value, prompts, lambda b, c: torch.zeros(len(c)), cfg, update, AdaptiveKLController(0.05), EOS, ptx_fn=ptx
        )
        return losses, grads, metrics

    losses0, grads0, _ = run(None)
    losses1, grads1, metrics1 = run(ptx_fn)
    lm = ptx_fn()
    lm.backward()
    lm_grad = torch.cat([p.grad.flatten() for p in policy.parameters()])
    policy.zero_grad(set_to_none=True)
    assert len(losses0) == len(losses1) == cfg.ppo_epochs * 2
    for a, b, ga, gb in zip(losses0, losses1, grads0, grads1):
        assert abs((b - a) - gamma * float(lm.detach())) < 1e-5
        assert_close(gb - ga, gamma * lm_grad, atol=2e-5, rtol=1e-4)
    assert abs(metrics1["ptx_loss"] - float(lm.detach())) < 1e-6
    assert float(lm_grad.abs().max()) > 1e-3


def test_ptx_stream_is_the_x_llama_pretraining_corpus():
    """`pretraining_tokens` reads the corpus x_llama pretrains on (x_llama's DataConfig.dataset, train split), each
    document encoded with bos, until `max_chars` characters."""
    from axon_shared.data import load_split
    from x_llama.config import DataConfig

    tokenizer = SimpleNamespace(encode=lambda text, bos: [1] + [3 + ord(ch) % 50 for ch in text])
    stream = ppo_module.pretraining_tokens(tokenizer, max_chars=3000)
    expected, total = [], 0
    for record in load_split(DataConfig().dataset, "train"):
        expected += tokenizer.encode(record["text"], bos=True)
        total += len(record["text"])
        if total >= 3000:
            break
    assert stream.tolist() == expected


# ------------------------------------------------------------------------------------------------------ evaluation


def test_measure_reports_kl_of_the_policy_to_the_reference():
    """`measure(policy, ref)` with two different models: the completions are the policy's samples at temperature 1
    from the given seed (torch's RNG left as it was), the KL is the mean of log pi(y|x) - log ref(y|x) over them
    (the sequence-level estimate of KL(pi || ref), DPO section 6.1), recomputed here unpadded, and the reward is the
    labeller's mean. Catches samples drawn from the reference or at the rollout temperature, and the KL's sign or
    arguments swapped."""
    from x_llama import generate

    policy, ref = tiny_llama(V, seed=0).eval(), tiny_llama(V, seed=1).eval()
    with torch.no_grad():  # a sharp policy against a near-uniform reference: KL(pi || ref) is several nats, so the
        policy.output.weight.mul_(16)  # 6-sample estimate is positive on every seed (3.3-9.1 on 8 seeds; 0.06 unscaled)
    prompts = [[1, 3 + i % 5, 4 + i % 3] for i in range(6)]
    tokenizer = SimpleNamespace(eos_id=EOS, decode=lambda ids: " ".join(map(str, ids)))
    labeler = lambda texts: [len(t) / 100 for t in texts]
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.5)  # measure samples at temperature 1 whatever this says
    state = torch.get_rng_state()
    metrics, details = measure(policy, ref, tokenizer, prompts, sampling, labeler, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(3)
    assert details["completions"] == generate(policy, prompts, max_new_tokens=5, temperature=1.0, eos_id=EOS)
    kl = [unpadded_logprob(policy, p, c) - unpadded_logprob(ref, p, c) for p, c in zip(prompts, details["completions"])]
    assert_close(torch.tensor(details["kl"], dtype=torch.float64), torch.tensor(kl, dtype=torch.float64), atol=1e-4, rtol=0)
    assert abs(metrics["kl"] - sum(kl) / len(kl)) < 1e-4 and metrics["kl"] > 1
    texts = [tokenizer.decode(p + c) for p, c in zip(prompts, details["completions"])]
    assert abs(metrics["reward"] - sum(labeler(texts)) / len(texts)) < 1e-12


def test_win_rate_counts_wins_and_half_ties():
    assert win_rate([0.5, 0.1, -0.2, 0.3], [0.1, 0.1, 0.4, -1.0]) == (1 + 0.5 + 0 + 1) / 4
    a, b = torch.randn(50, generator=torch.Generator().manual_seed(0)).tolist(), [0.0] * 50
    assert abs(win_rate(a, b) + win_rate(b, a) - 1) < 1e-12 and win_rate(a, b) == sum(x > 0 for x in a) / 50


@pytest.mark.parametrize("compile", [False, True])
def test_sample_completions_batches_the_prompts_and_passes_the_sampling_options(monkeypatch, compile):
    """`sample_completions` hands x_llama's `generate` consecutive chunks of `sampling.batch_size` prompts with the
    sampling options, `compile` included (the compiled step itself is tested in x_llama's test_decode_step.py)."""
    from instructgpt_rlhf import rollout as rollout_module

    calls = []

    def spy(model, chunk, **kwargs):
        calls.append((chunk, kwargs))
        return [[len(p)] for p in chunk]

    monkeypatch.setattr(rollout_module, "generate", spy)
    prompts = [[1] * (1 + i) for i in range(5)]
    sampling = SamplingConfig(max_new_tokens=7, temperature=0.7, batch_size=2, compile=compile)
    out = rollout_module.sample_completions(None, prompts, sampling, eos_id=EOS)
    assert out == [[1], [2], [3], [4], [5]]
    assert [chunk for chunk, _ in calls] == [prompts[0:2], prompts[2:4], prompts[4:5]]
    expected = dict(max_new_tokens=7, temperature=0.7, eos_id=EOS, use_cache=True, compile=compile)
    assert all(kwargs == expected for _, kwargs in calls)
