"""Greedy and beam search: agreement, ordering, early stopping, length limits, length penalty."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from transformer import Transformer, TransformerConfig, beam_search, greedy_decode, length_penalty

PAD, EOS = 3, 2
CFG = TransformerConfig(vocab_size=40, d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, dropout=0.0, max_len=48)


def make_model(seed=0, eos_bias=0.0):
    """A random model; eos_bias shifts the eos logit (its tied output row moves along the mean decoder state)."""
    torch.manual_seed(seed)
    model = Transformer(CFG).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        src, tgt = torch.randint(4, 40, (8, 6), generator=gen), torch.randint(4, 40, (8, 10), generator=gen)
        mean_state = model.decode(tgt, *model.encode(src)).mean((0, 1))
        model.embedding.weight[EOS] += eos_bias * mean_state / mean_state.pow(2).sum()
    return model


@pytest.fixture(scope="module")
def half_trained():
    """A model trained briefly to reverse sequences of 1..6 tokens: outputs of varied lengths, uncertain enough
    that beam search and greedy decoding disagree on some inputs."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(120):
        lengths = torch.randint(1, 7, (32,), generator=gen)
        rows = [torch.randint(4, 40, (int(n),), generator=gen).tolist() for n in lengths]
        src = torch.full((32, 7), PAD)
        tgt_in, tgt_out = torch.full((32, 7), PAD), torch.full((32, 7), PAD)
        for i, r in enumerate(rows):
            src[i, : len(r) + 1] = torch.tensor(r + [EOS])
            tgt_in[i, : len(r) + 1] = torch.tensor([1] + r[::-1])
            tgt_out[i, : len(r) + 1] = torch.tensor(r[::-1] + [EOS])
        loss = nn.functional.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def sources(seed=0, b=8):
    """Right-padded sources of 1..6 tokens + eos."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (b,), generator=gen)
    lengths[0] = 6
    src = torch.full((b, 7), PAD)
    for i, n in enumerate(lengths.tolist()):
        src[i, :n] = torch.randint(4, 40, (n,), generator=gen)
        src[i, n] = EOS
    return src


def sequence_log_prob(model, src_row, tokens):
    """log p(tokens + eos | src) by a full forward pass."""
    cfg = model.config
    tgt_in = torch.tensor([[cfg.bos_id] + tokens])
    tgt_out = torch.tensor([tokens + [cfg.eos_id]])
    src_row = src_row[src_row != PAD][None]
    logp = torch.log_softmax(model(src_row, tgt_in).double(), -1)
    return logp.gather(-1, tgt_out[..., None]).sum().item()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_size_one_equals_greedy(half_trained, seed):
    src = sources(seed, b=16)
    greedy = greedy_decode(half_trained, src, max_len=12)
    beam = beam_search(half_trained, src, beam_size=1, alpha=0.0, max_len=12)
    assert [h[0].tokens for h in beam] == greedy
    assert len({len(g) for g in greedy}) > 2  # outputs stop on eos at different lengths


def test_greedy_matches_stepwise_argmax_of_full_forward(half_trained):
    src = sources(3)
    for row, out in zip(src, greedy_decode(half_trained, src, max_len=12)):
        prefix = []
        while len(prefix) < 11:
            token = int(half_trained(row[row != PAD][None], torch.tensor([[1] + prefix]))[0, -1].argmax())
            if token == EOS:
                break
            prefix.append(token)
        assert out == prefix


def test_beam_hypotheses_sorted_and_scored(half_trained):
    src = sources(1)
    alpha = 0.6  # the paper's (section 6.1), and the default
    results = beam_search(half_trained, src, beam_size=4, max_len=12)
    assert len(results) == src.shape[0]
    for row, hyps in zip(src, results):
        assert len(hyps) == 4
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 4
        for h in hyps:  # score = log p(y|x) / lp(|y| + eos), recomputed by a full forward pass
            logp = sequence_log_prob(half_trained, row, h.tokens)
            assert h.log_prob == pytest.approx(logp, abs=1e-4)
            assert h.score == pytest.approx(logp / length_penalty(len(h.tokens) + 1, alpha), abs=1e-4)


def test_beam_not_worse_than_greedy_and_early_stopping_is_exact(half_trained):
    src = sources(2, b=32)
    greedy = greedy_decode(half_trained, src, max_len=12)
    early = beam_search(half_trained, src, beam_size=4, alpha=0.6, max_len=12)
    full = beam_search(half_trained, src, beam_size=4, alpha=0.6, max_len=12, early_stopping=False)
    better = 0
    for row, g, e, f in zip(src, greedy, early, full):
        greedy_score = sequence_log_prob(half_trained, row, g) / length_penalty(len(g) + 1, 0.6)
        assert e[0].score >= greedy_score - 1e-5
        better += e[0].score > greedy_score + 1e-4
        assert [h.tokens for h in e] == [h.tokens for h in f]  # stopping early never changes the result
    assert better > 0  # the beam found something greedy missed


def test_length_limits():
    model = make_model(0, eos_bias=-50.0)  # eos practically never chosen: every output runs to its limit
    src = sources(0)
    src_len = (src != PAD).sum(1)
    greedy = greedy_decode(model, src, max_len_a=1.0, max_len_b=3)
    assert [len(g) for g in greedy] == (src_len + 3 - 1).tolist()  # limit counts the forced eos
    beams = beam_search(model, src, beam_size=3, max_len_a=1.0, max_len_b=3)
    assert [len(h[0].tokens) for h in beams] == (src_len + 3 - 1).tolist()
    assert all(len(g) <= 47 for g in greedy_decode(model, src, max_len_a=1.0, max_len_b=500))  # capped by max_len


def test_length_penalty_values():
    assert length_penalty(1, 0.6) == pytest.approx(1.0)
    assert length_penalty(7, 0.6) == pytest.approx(2.0**0.6)
    assert length_penalty(10, 0.0) == 1.0
    assert length_penalty(3, 0.6) == pytest.approx((8 / 6) ** 0.6)  # not a whole multiple of 6
    assert_close(length_penalty(torch.tensor([2, 9]), 1.0), torch.tensor([7 / 6, 14 / 6]))


def test_greedy_stops_decoding_once_every_sentence_has_its_eos():
    """A model that always prefers eos: one decode step for the whole batch, then the loop ends."""
    model = make_model(0, eos_bias=50.0)
    calls = []
    step = model.decode_step
    model.decode_step = lambda *args, **kwargs: calls.append(1) or step(*args, **kwargs)
    assert greedy_decode(model, sources(0), max_len=12) == [[]] * 8
    assert len(calls) == 1


def test_batched_beam_equals_one_by_one(half_trained):
    src = sources(4)
    batched = beam_search(half_trained, src, beam_size=3, max_len=12)
    for i in range(src.shape[0]):
        row = src[i : i + 1]
        row = row[:, : int((row != PAD).sum())]
        single = beam_search(half_trained, row, beam_size=3, max_len=12)[0]
        assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
        assert_close(torch.tensor([h.score for h in single]), torch.tensor([h.score for h in batched[i]]), rtol=1e-5, atol=1e-5)


def test_min_len_bans_early_eos(half_trained):
    src = sources(5)
    assert min(len(g) for g in greedy_decode(half_trained, src, max_len=12)) < 5
    assert min(len(g) for g in greedy_decode(half_trained, src, max_len=12, min_len=5)) >= 5
    assert min(len(h[0].tokens) for h in beam_search(half_trained, src, beam_size=3, max_len=12, min_len=5)) >= 5


def test_min_len_is_exact_when_eos_is_preferred():
    """A model that always prefers eos: with min_len = m every output has exactly m tokens (eos is banned at the m
    first steps and taken at the next), with greedy and with beam search."""
    model = make_model(0, eos_bias=50.0)
    src = sources(0)
    assert greedy_decode(model, src, max_len=12) == [[]] * src.shape[0]
    for m in (1, 3):
        assert [len(g) for g in greedy_decode(model, src, max_len=12, min_len=m)] == [m] * src.shape[0]
        assert [len(h[0].tokens) for h in beam_search(model, src, beam_size=3, max_len=12, min_len=m)] == [m] * src.shape[0]


def test_default_limit_is_source_length_plus_50_and_at_least_eos():
    """The paper's limit (section 6.1, input length + 50, eos included) is the default of both decoders; a limit of
    0 still leaves room for the eos, so the output is empty."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CFG, max_len=128)).eval()
    with torch.no_grad():
        model.embedding.weight[EOS] -= 50.0 * model.embedding.weight.mean(0) / model.embedding.weight.mean(0).pow(2).sum()
    src = sources(1, b=3)
    src_len = (src != PAD).sum(1)
    assert [len(g) for g in greedy_decode(model, src)] == (src_len + 50 - 1).tolist()
    assert [len(h[0].tokens) for h in beam_search(model, src, beam_size=2)] == (src_len + 50 - 1).tolist()
    for limit in dict(max_len=1), dict(max_len_a=0.0, max_len_b=0):
        assert greedy_decode(model, src, **limit) == [[]] * 3
        assert [h[0].tokens for h in beam_search(model, src, beam_size=2, **limit)] == [[]] * 3


def _textbook_beam(model, src_row, k, alpha, limit):
    """One sentence, hypotheses as Python lists, every prefix scored by a full forward pass: expand every alive
    hypothesis by every token, keep the 2K best, an eos candidate among the K best finishes (score log p / lp), the
    K best others stay alive; at the limit only eos may follow. No early stopping."""
    src_row = src_row[src_row != PAD][None]
    alive, finished = [([], 0.0)], []
    for t in range(limit):
        candidates = []
        for tokens, logp in alive:
            with torch.no_grad():
                step = torch.log_softmax(model(src_row, torch.tensor([[1] + tokens])).double()[0, -1], -1)
            for token in [EOS] if t + 1 >= limit else range(step.shape[0]):
                candidates.append((tokens + [token], logp + float(step[token])))
        candidates = sorted(candidates, key=lambda c: -c[1])[: 2 * k]
        for rank, (tokens, logp) in enumerate(candidates):
            if tokens[-1] == EOS and rank < k:
                finished.append((tokens[:-1], logp / length_penalty(len(tokens), alpha)))
        finished = sorted(finished, key=lambda f: -f[1])[:k]
        alive = [c for c in candidates if c[0][-1] != EOS][:k]
        if not alive:
            break
    return finished


def test_beam_search_equals_a_textbook_beam_search(half_trained):
    """The batched search (2K candidates, cached steps, sentences dropped as they finish, early stopping) against
    the one-sentence loop above, at K = 4 (the default) and K = 2, and on a random model with a raised eos logit
    (so that hypotheses finish at different lengths)."""
    src = sources(6, b=6)
    for model, k in ((half_trained, 4), (half_trained, 2), (make_model(1, eos_bias=1.0), 4)):
        results = beam_search(model, src, max_len=8) if k == 4 else beam_search(model, src, beam_size=k, max_len=8)
        for row, hyps in zip(src, results):
            expected = _textbook_beam(model, row, k, 0.6, 8)
            assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
            assert_close(
                torch.tensor([h.score for h in hyps]), torch.tensor([s for _, s in expected], dtype=torch.float32), atol=1e-4, rtol=0
            )


def test_early_stopping_saves_decode_steps(half_trained):
    """Early stopping ends the loop before the length limit once no alive hypothesis can beat the finished ones."""
    src = sources(2, b=8)
    counts = {}
    step = half_trained.decode_step
    for early in (True, False):
        calls = []
        half_trained.decode_step = lambda *args, calls=calls, **kwargs: calls.append(1) or step(*args, **kwargs)
        try:
            beam_search(half_trained, src, beam_size=4, max_len=30, early_stopping=early)
        finally:
            del half_trained.decode_step
        counts[early] = len(calls)
    assert counts[True] < counts[False] <= 30
