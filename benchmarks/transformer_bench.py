"""Ours vs transformers' MarianMTModel with the same dimensions (random weights, same batch, same process).

    python benchmarks/transformer_bench.py [--quick] [--preset cpu]

Measures training throughput (target tokens/s of forward + backward + Adam step, dropout on) and beam-4
decoding throughput (sentences/s, fixed output length so both do the same work), and prints ours/theirs.
Set AXON_THREADS=1 to measure on one thread, as the README's numbers were.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import MarianConfig, MarianMTModel

from transformer import Transformer, TransformerConfig, beam_search, label_smoothed_loss


def marian_like(cfg: TransformerConfig) -> MarianMTModel:
    """Marian (post-norm, sinusoidal positions, scaled tied embeddings, ReLU) with our dimensions."""
    config = MarianConfig(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        encoder_layers=cfg.n_encoder_layers,
        decoder_layers=cfg.n_decoder_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.d_ff,
        decoder_ffn_dim=cfg.d_ff,
        activation_function="relu",
        dropout=cfg.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=cfg.max_len,
        scale_embedding=True,
        pad_token_id=cfg.pad_id,
        eos_token_id=cfg.eos_id,
        forced_eos_token_id=None,
        decoder_start_token_id=cfg.bos_id,
        bos_token_id=cfg.bos_id,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return MarianMTModel(config)


def make_batch(cfg: TransformerConfig, batch: int, length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=gen)
    src = torch.full((batch, length), cfg.pad_id)
    tgt_in, tgt_out = src.clone(), src.clone()
    for i, n in enumerate(lengths.tolist()):
        ids = torch.randint(4, cfg.vocab_size, (n,), generator=gen)
        src[i, :n], src[i, n - 1] = ids, cfg.eos_id
        tgt_in[i, 0], tgt_in[i, 1:n] = cfg.bos_id, ids[: n - 1]
        tgt_out[i, : n - 1], tgt_out[i, n - 1] = ids[: n - 1], cfg.eos_id
    return src, tgt_in, tgt_out


def interleaved_times(fns: list, rounds: int) -> list[float]:
    """Median seconds per call of each function, calling them in alternation (one warm-up call each), so that
    load from other processes on a shared machine hits both sides alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 repetition")
    parser.add_argument("--preset", default="cpu")
    args = parser.parse_args()
    threads = int(os.environ.get("AXON_THREADS", 0))
    if threads:
        torch.set_num_threads(threads)
    cfg = TransformerConfig.from_preset("tiny" if args.quick else args.preset, max_len=128)
    batch, length, steps = (8, 12, 1) if args.quick else (64, 32, 7)
    n_sentences, out_len, decode_rounds = (4, 8, 1) if args.quick else (32, 30, 3)
    torch.manual_seed(0)
    ours, theirs = Transformer(cfg), marian_like(cfg)
    src, tgt_in, tgt_out = make_batch(cfg, batch, length)
    n_tokens = int((tgt_out != cfg.pad_id).sum())
    print(
        f"config: {args.preset if not args.quick else 'tiny'} d_model={cfg.d_model} layers={cfg.n_encoder_layers}+{cfg.n_decoder_layers} "
        f"vocab={cfg.vocab_size}; params ours {sum(p.numel() for p in ours.parameters()):,} / Marian "
        f"{sum(p.numel() for p in theirs.parameters()):,}; torch threads {torch.get_num_threads()}"
    )

    # ---- training: same batch, same loss function on the logits, Adam step -------------------------------------
    def train_step(model, forward):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)

        def step():
            loss, _, n = label_smoothed_loss(forward(), tgt_out, epsilon=0.1, pad_id=cfg.pad_id)
            optimizer.zero_grad(set_to_none=True)
            (loss / n).backward()
            optimizer.step()

        return step

    ours.train(), theirs.train()
    src_mask = (src != cfg.pad_id).long()
    t_ours, t_theirs = interleaved_times(
        [
            train_step(ours, lambda: ours(src, tgt_in)),
            train_step(theirs, lambda: theirs(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt_in).logits),
        ],
        steps,
    )
    rows = [("training tokens/s", n_tokens / t_ours, n_tokens / t_theirs)]

    # ---- beam-4 decoding: fixed output length (eos banned before out_len tokens in both) ---------------------------
    ours.eval(), theirs.eval()
    dec_src, dec_mask = src[:n_sentences], src_mask[:n_sentences]
    kwargs = dict(num_beams=4, max_new_tokens=out_len + 1, min_new_tokens=out_len, early_stopping=True, length_penalty=0.6, do_sample=False)
    outputs = {}

    @torch.no_grad()
    def decode_ours():
        outputs["ours"] = beam_search(ours, dec_src, beam_size=4, alpha=0.6, max_len=out_len + 1, min_len=out_len, early_stopping=True)

    @torch.no_grad()
    def decode_theirs():
        outputs["theirs"] = theirs.generate(input_ids=dec_src, attention_mask=dec_mask, **kwargs)

    t_ours, t_theirs = interleaved_times([decode_ours, decode_theirs], decode_rounds)
    ours_len = sum(len(h[0].tokens) for h in outputs["ours"]) / n_sentences
    theirs_len = (outputs["theirs"][:, 1:] != cfg.pad_id).sum(1).float().mean().item()
    rows.append(("beam-4 sentences/s", n_sentences / t_ours, n_sentences / t_theirs))

    print(
        f"training batch: {batch} sentences, {n_tokens} target tokens; decoding: {n_sentences} sentences; medians of {steps} / {decode_rounds} interleaved repetitions; "
        f"mean output tokens ours {ours_len:.1f} (+ eos) / Marian {theirs_len:.1f} (incl. eos)"
    )
    print(f"{'metric':<22}{'ours':>12}{'Marian':>12}{'ours/theirs':>14}")
    for name, a, b in rows:
        print(f"{name:<22}{a:>12.1f}{b:>12.1f}{a / b:>14.2f}")


if __name__ == "__main__":
    main()
