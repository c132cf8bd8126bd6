"""Ours vs transformers' MarianMTModel with the same dimensions (random weights, same batch, same process).

    python benchmarks/transformer_bench.py [--quick] [--preset cpu]

Measures training throughput (target tokens/s of forward + backward + Adam step, dropout on) in three precision
modes, each side in the same one: fp32 eager, bf16 autocast eager, bf16 autocast + torch.compile (ours with
fullgraph, the model and the loss in one graph as `train.compile` does; Marian the same loss function compiled,
graph breaks allowed), with MFU against the fp32 and bf16 matmul peaks measured in the run (FLOPs counted by
PyTorch's FlopCounterMode); then beam-4 decoding throughput in fp32 (sentences/s, fixed output length so both do
the same work). Ratios are ours / theirs speed. AXON_THREADS sets the thread count (default: all).
"""

from __future__ import annotations

import argparse
import os

import torch
from transformers import MarianMTModel

from common import MODES, counted_flops, interleaved, peaks, precision
from transformer import Transformer, TransformerConfig, beam_search, label_smoothed_loss
from transformer.export import marian_config


def marian_like(cfg: TransformerConfig) -> MarianMTModel:
    """Marian (post-norm, sinusoidal positions, scaled tied embeddings) with our dimensions: the export's config."""
    config = marian_config(cfg)
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

    # ---- training: same batch, same loss function on the logits, Adam step, in each precision mode -------------
    machine = peaks(512 if args.quick else 1024)
    src_mask = (src != cfg.pad_id).long()

    def train_step(model, forward, mode):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)

        def loss_of(src, tgt_in, tgt_out):
            loss, _, n = label_smoothed_loss(forward(model, src, tgt_in), tgt_out, epsilon=0.1, pad_id=cfg.pad_id)
            return loss / n

        # ours must capture one graph (the engine's train.compile); Marian may break its graph
        loss_fn = torch.compile(loss_of, fullgraph=model is not theirs) if "compiled" in mode else loss_of

        def step():
            with precision(mode):
                loss = loss_fn(src, tgt_in, tgt_out)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    def ours_forward(model, src, tgt_in):
        return model(src, tgt_in)

    def marian_forward(model, src, tgt_in):
        return model(input_ids=src, attention_mask=(src != cfg.pad_id).long(), decoder_input_ids=tgt_in).logits

    ours.train(), theirs.train()
    flops = counted_flops(train_step(ours, ours_forward, "fp32 eager"))
    rows = []
    for mode in MODES:
        torch.manual_seed(0)
        t_ours, t_theirs = interleaved([train_step(ours, ours_forward, mode), train_step(theirs, marian_forward, mode)], steps)
        rows.append((mode, n_tokens / t_ours, n_tokens / t_theirs, flops / t_ours, flops / t_theirs))
        torch._dynamo.reset()
    print(
        f"measured matmul peak: fp32 {machine['fp32'] / 1e9:.0f} GFLOP/s, bf16 {machine['bf16'] / 1e9:.0f} GFLOP/s; "
        f"training step {flops / 1e9:.1f} GFLOP (FlopCounterMode), {batch} sentences, {n_tokens} target tokens, "
        f"medians of {steps} interleaved steps"
    )
    print(f"{'training mode':<15}{'ours tok/s':>11}{'Marian tok/s':>13}{'ratio':>8}{'MFU fp32':>10}{'MFU mode':>10}{'Marian MFU mode':>17}")
    for mode, ours_speed, theirs_speed, ours_flops, theirs_flops in rows:
        peak = machine["bf16" if "bf16" in mode else "fp32"]  # "mode": the peak of the mode's precision
        print(
            f"{mode:<15}{ours_speed:>11,.0f}{theirs_speed:>13,.0f}{ours_speed / theirs_speed:>7.2f}x{ours_flops / machine['fp32']:>10.1%}"
            f"{ours_flops / peak:>10.1%}{theirs_flops / peak:>17.1%}"
        )

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

    t_ours, t_theirs = interleaved([decode_ours, decode_theirs], decode_rounds, warmup=1)
    ours_len = sum(len(h[0].tokens) for h in outputs["ours"]) / n_sentences
    theirs_len = (outputs["theirs"][:, 1:] != cfg.pad_id).sum(1).float().mean().item()
    print(
        f"\nbeam-4 decoding, fp32, {n_sentences} sentences, medians of {decode_rounds} interleaved runs; mean output tokens "
        f"ours {ours_len:.1f} (+ eos) / Marian {theirs_len:.1f} (incl. eos): ours {n_sentences / t_ours:.1f} sentences/s, "
        f"Marian {n_sentences / t_theirs:.1f} -> {t_theirs / t_ours:.2f}x"
    )


if __name__ == "__main__":
    main()
