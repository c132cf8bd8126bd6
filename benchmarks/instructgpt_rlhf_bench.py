"""instructgpt_rlhf benchmark: ours vs the reference libraries, same process, same x_llama weights and batches.

1. DPO training step (policy forward+backward, reference forward, AdamW step): our `pair_logprobs` + `dpo_loss`
   vs trl 1.16 `DPOTrainer.compute_loss` on x_llama's HF wrapper. Throughput in tokens/s (non-pad tokens).
2. PPO rollout: our sampler (x_llama `generate`, KV cache, left-padded batches) vs transformers' `generate()` on the
   HF wrapper (do_sample, same temperature, no top-k). Generated tokens/s.
3. A whole PPO iteration (rollout + scoring + GAE + minibatch updates) with our rollout vs with the HF rollout.

Run: python benchmarks/instructgpt_rlhf_bench.py [--quick]   (prints a table; ratio = ours / theirs speed)
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t0)
    return sorted(best)[len(best) // 2]  # median


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, one repeat")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("AXON_THREADS", 0)) or torch.get_num_threads())

    import datasets
    from trl import DPOConfig, DPOTrainer

    from instructgpt_rlhf import ppo as ppo_module
    from instructgpt_rlhf.config import PPOConfig, PPOTrain, SamplingConfig
    from instructgpt_rlhf.dpo import pair_logprobs
    from instructgpt_rlhf.losses import AdaptiveKLController, dpo_loss
    from instructgpt_rlhf.model import ScalarHeadModel
    from instructgpt_rlhf.ppo import ppo_iteration
    from x_llama import Llama, LlamaConfig
    from x_llama.hf import XLlamaForCausalLM

    quick = args.quick
    if quick:
        config = LlamaConfig.from_preset("tiny")
        pairs_n, new_tokens, gen_batch, repeats = 4, 8, 8, 1
    else:  # the model of the CPU pipeline run (x_llama "demo" size)
        config = LlamaConfig.from_preset("cpu", dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=2048)
        pairs_n, new_tokens, gen_batch, repeats = 16, 32, 64, 3
    torch.manual_seed(0)
    V = config.vocab_size
    policy = Llama(config)
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(4, V, (n,), generator=g))

    data = [
        {
            "prompt": words(int(torch.randint(2, 9, (1,), generator=g))),
            "chosen": " " + words(int(torch.randint(8, 25, (1,), generator=g))),
            "rejected": " " + words(int(torch.randint(8, 25, (1,), generator=g))),
        }
        for _ in range(pairs_n)
    ]
    rows = []

    # ---- 1. DPO step ------------------------------------------------------------------------------------------
    tok = word_tokenizer(V)
    trl_policy = XLlamaForCausalLM.from_llama(copy.deepcopy(policy), eos_token_id=2, bos_token_id=1, pad_token_id=3)
    trl_ref = XLlamaForCausalLM.from_llama(copy.deepcopy(policy), eos_token_id=2, bos_token_id=1, pad_token_id=3)
    dpo_args = DPOConfig(
        output_dir="/tmp/instructgpt_rlhf_bench", bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=pairs_n, beta=0.1
    )
    trainer = DPOTrainer(
        model=trl_policy, ref_model=trl_ref, args=dpo_args, train_dataset=datasets.Dataset.from_list(data), processing_class=tok
    )
    examples = [trainer.train_dataset[i] for i in range(pairs_n)]
    batch = trainer.data_collator(examples)
    n_tokens = int(batch["attention_mask"].sum())
    trl_opt = torch.optim.AdamW(trainer.model.parameters(), lr=1e-5)

    def trl_step():
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        trl_opt.step()
        trl_opt.zero_grad()

    ours_policy, ours_ref = copy.deepcopy(policy), copy.deepcopy(policy).eval().requires_grad_(False)
    pairs = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    our_opt = torch.optim.AdamW(ours_policy.parameters(), lr=1e-5)

    def our_step():
        with torch.no_grad():
            rc, rr = pair_logprobs(ours_ref, pairs)
        pc, pr = pair_logprobs(ours_policy, pairs)
        loss, _, _ = dpo_loss(pc, pr, rc, rr, 0.1)
        loss.backward()
        our_opt.step()
        our_opt.zero_grad()

    t_trl, t_ours = timeit(trl_step, repeats), timeit(our_step, repeats)
    rows.append(("DPO step (tokens/s)", n_tokens / t_ours, n_tokens / t_trl))

    # ---- 2. rollout -------------------------------------------------------------------------------------------
    prompts = [[1] + torch.randint(4, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(gen_batch)]
    sampling = SamplingConfig(max_new_tokens=new_tokens, batch_size=gen_batch, temperature=1.0)
    hf = XLlamaForCausalLM.from_llama(policy, eos_token_id=None, bos_token_id=1, pad_token_id=0).eval()

    def hf_rollout(model_prompts):
        from x_llama.generation import left_pad

        ids, mask = left_pad(model_prompts, pad_id=0)
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        return [row.tolist() for row in out[:, ids.shape[1] :]]

    def ours_rollout(model_prompts):
        from x_llama import generate

        return generate(policy, model_prompts, max_new_tokens=new_tokens, temperature=1.0, eos_id=None)

    gen_tokens = gen_batch * new_tokens  # EOS disabled on both sides: every row decodes max_new_tokens
    t_hf = timeit(lambda: hf_rollout(prompts), repeats)
    t_our = timeit(lambda: ours_rollout(prompts), repeats)
    rows.append(("PPO rollout (generated tokens/s)", gen_tokens / t_our, gen_tokens / t_hf))

    # ---- 3. whole PPO iteration ------------------------------------------------------------------------------
    cfg = PPOConfig(ppo_epochs=2, minibatch_size=gen_batch // 4, sampling=sampling, train=PPOTrain(batch_size=gen_batch, lr=1e-5))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = ScalarHeadModel(config)
    rm = ScalarHeadModel(config).eval().requires_grad_(False)
    params = list(policy.parameters()) + list(value.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    kl = AdaptiveKLController(0.05)

    def update(loss):  # what the training loop's Trainer.update does
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def score_fn(b, completions):
        return rm.score(b.tokens, b.attention_mask)

    def iteration():
        ppo_iteration(policy, ref, value, prompts, score_fn, cfg, update, kl, eos_id=2)

    original = ppo_module.sample_completions
    t_iter_ours = timeit(iteration, max(1, repeats - 1))
    ppo_module.sample_completions = lambda model, ps, s, eos: hf_rollout(ps)
    try:
        t_iter_hf = timeit(iteration, max(1, repeats - 1))
    finally:
        ppo_module.sample_completions = original
    rows.append(("PPO iteration (iterations/s)", 1 / t_iter_ours, 1 / t_iter_hf))

    threads = torch.get_num_threads()
    print(
        f"instructgpt_rlhf benchmark: x_llama dim={config.dim} layers={config.n_layers} vocab={V}, {threads} thread(s){' (quick)' if quick else ''}"
    )
    print(f"{'measure':<36} {'ours':>12} {'reference':>12} {'ours/ref':>9}   reference")
    refs = ["trl 1.16 DPOTrainer.compute_loss", "transformers generate() (HF wrapper)", "same update, HF generate() rollout"]
    for (name, ours, theirs), ref_name in zip(rows, refs):
        print(f"{name:<36} {ours:>12.4g} {theirs:>12.4g} {ours / theirs:>8.2f}x   {ref_name}")


if __name__ == "__main__":
    main()
