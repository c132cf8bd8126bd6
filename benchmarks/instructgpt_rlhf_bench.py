"""instructgpt_rlhf benchmark: ours vs the reference libraries, same process, same x_llama weights and batches.

1. DPO training step (policy forward+backward, reference forward, AdamW step): our `batch_logprobs` + `dpo_loss`
   (what `run_dpo` runs) vs trl's `DPOTrainer.compute_loss` on `transformers.LlamaForCausalLM` holding the same
   weights (`to_hf`). Three precision modes, each side in the same one: fp32 eager, bf16 autocast eager, bf16
   autocast + torch.compile (ours: the policy's loss in one graph, as `train.compile` does; trl: the policy model
   compiled, graph breaks allowed). Our frozen reference runs in fp32 without gradients in every mode, as
   `run_dpo` does; trl's runs in the mode. Throughput in tokens/s (non-pad tokens).
2. PPO rollout: our sampler (x_llama `generate`, KV cache, left-padded batches) vs transformers' `generate()` on
   `LlamaForCausalLM` with its own KV cache (do_sample, same temperature, no top-k). Generated tokens/s. Then each
   decoding step compiled on both sides: ours `generate(compile=True)` (`sampling.compile`), theirs `generate()` with
   its static cache and a `CompileConfig` with the same inductor options.
3. A whole PPO iteration (rollout + scoring + GAE + minibatch updates) with our rollout vs with the HF rollout.

Run: python benchmarks/instructgpt_rlhf_bench.py [--quick]   (prints a table; ratio = ours / theirs speed)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time

import torch

from common import MODES, interleaved, precision


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
    import trl
    from trl import DPOConfig, DPOTrainer

    from instructgpt_rlhf import ppo as ppo_module
    from instructgpt_rlhf.config import PPOConfig, PPOTrain, SamplingConfig
    from instructgpt_rlhf.dpo import batch_logprobs, pair_batch
    from instructgpt_rlhf.losses import AdaptiveKLController, dpo_loss
    from instructgpt_rlhf.model import ScalarHeadModel
    from instructgpt_rlhf.ppo import ppo_iteration
    from x_llama import Llama, LlamaConfig
    from x_llama.hf import to_hf

    quick = args.quick
    trl_version = trl.__version__
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

    # ---- 1. DPO step, in each precision mode --------------------------------------------------------------------
    tok = word_tokenizer(V)

    def hf_llama(model):
        hf = to_hf(copy.deepcopy(model), attn_implementation="sdpa")
        hf.config.update(dict(eos_token_id=2, bos_token_id=1, pad_token_id=3))
        return hf

    dpo_args = DPOConfig(
        output_dir="/tmp/instructgpt_rlhf_bench", bf16=False, use_cpu=True, report_to="none", per_device_train_batch_size=pairs_n, beta=0.1
    )
    trainer = DPOTrainer(
        model=hf_llama(policy),
        ref_model=hf_llama(policy),
        args=dpo_args,
        train_dataset=datasets.Dataset.from_list(data),
        processing_class=tok,
    )
    examples = [trainer.train_dataset[i] for i in range(pairs_n)]
    trl_batch = trainer.data_collator(examples)
    n_tokens = int(trl_batch["attention_mask"].sum())
    pairs = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    ours_batch = pair_batch(pairs)

    def trl_step_fn(mode):
        model = trainer.model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        compiled = torch.compile(model) if "compiled" in mode else model

        def step():
            model.train()
            with precision(mode):
                loss = trainer.compute_loss(compiled, trl_batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    def our_step_fn(mode, ours_policy, ours_ref):
        optimizer = torch.optim.AdamW(ours_policy.parameters(), lr=1e-5)

        def loss_of(batch, reference_chosen, reference_rejected):
            return dpo_loss(*batch_logprobs(ours_policy, batch), reference_chosen, reference_rejected, 0.1)[0]

        loss_fn = torch.compile(loss_of, fullgraph=True) if "compiled" in mode else loss_of

        def step():
            with torch.no_grad():
                reference = batch_logprobs(ours_ref, ours_batch)
            with precision(mode):
                loss = loss_fn(ours_batch, *reference)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    for mode in MODES:
        ours_policy, ours_ref = copy.deepcopy(policy), copy.deepcopy(policy).eval().requires_grad_(False)
        t_ours, t_trl = interleaved([our_step_fn(mode, ours_policy, ours_ref), trl_step_fn(mode)], repeats, warmup=2)
        rows.append((f"DPO step, {mode} (tokens/s)", n_tokens / t_ours, n_tokens / t_trl, f"trl {trl_version} DPOTrainer.compute_loss"))
        torch._dynamo.reset()

    # ---- 2. rollout -------------------------------------------------------------------------------------------
    prompts = [[1] + torch.randint(4, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(gen_batch)]
    sampling = SamplingConfig(max_new_tokens=new_tokens, batch_size=gen_batch, temperature=1.0)
    hf = to_hf(policy, attn_implementation="sdpa").eval()  # transformers' Llama, its own dynamic KV cache in generate()

    def hf_rollout(model_prompts, compile: bool = False):
        from transformers import CompileConfig

        from x_llama.generation import left_pad
        from x_llama.model import decode_compile_options, decode_mm_limits, mm_pass_limits

        ids, mask = left_pad(model_prompts, pad_id=0)
        kwargs = {}
        if compile:  # the static cache, compiled (on CPU only when told to), with our step's inductor options
            options = decode_compile_options(len(model_prompts))
            config = CompileConfig(fullgraph=True, dynamic=False, mode=None, options=options)
            config._compile_all_devices = True
            kwargs = dict(cache_implementation="static", compile_config=config)
        limits = mm_pass_limits(decode_mm_limits(len(model_prompts))) if compile else contextlib.nullcontext()
        with torch.no_grad(), limits:  # our step's limits
            out = hf.generate(
                **kwargs,
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

    def ours_rollout(model_prompts, compile: bool = False):
        from x_llama import generate

        return generate(policy, model_prompts, max_new_tokens=new_tokens, temperature=1.0, eos_id=None, compile=compile)

    gen_tokens = gen_batch * new_tokens  # EOS disabled on both sides: every row decodes max_new_tokens
    t_our, t_hf = interleaved([lambda: ours_rollout(prompts), lambda: hf_rollout(prompts)], repeats, warmup=1)
    rows.append(
        ("PPO rollout (generated tokens/s)", gen_tokens / t_our, gen_tokens / t_hf, "transformers LlamaForCausalLM.generate() + KV cache")
    )
    t_our, t_hf = interleaved([lambda: ours_rollout(prompts, compile=True), lambda: hf_rollout(prompts, compile=True)], repeats, warmup=2)
    rows.append(("PPO rollout, each step compiled (tokens/s)", gen_tokens / t_our, gen_tokens / t_hf, "the same, static cache, compiled"))

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
    rows.append(("PPO iteration (iterations/s)", 1 / t_iter_ours, 1 / t_iter_hf, "same update, HF generate() rollout"))

    threads = torch.get_num_threads()
    print(
        f"instructgpt_rlhf benchmark: x_llama dim={config.dim} layers={config.n_layers} vocab={V}, {threads} thread(s){' (quick)' if quick else ''}"
    )
    print(f"{'measure':<42} {'ours':>12} {'reference':>12} {'ours/ref':>9}   reference")
    for name, ours, theirs, ref_name in rows:
        print(f"{name:<42} {ours:>12.4g} {theirs:>12.4g} {ours / theirs:>8.2f}x   {ref_name}")


if __name__ == "__main__":
    main()
