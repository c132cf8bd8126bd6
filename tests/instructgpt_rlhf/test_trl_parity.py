"""Parity with trl 1.16 on the same x_llama model and the same batch, trl running on x_llama's Hugging Face wrappers:

- DPO: our `pair_logprobs` (on our own left-padded batch layout) + `dpo_loss` == DPOTrainer.compute_loss for
  loss_type "sigmoid" (DPO eq. 7, label_smoothing 0) at beta 0.1 and 0.5, and "ipo" (Azar et al. eq. 17) at beta 0.3
  with trl's per-token length normalisation of each log-ratio;
- the reward model: `ScalarHeadModel.score` + `reward_model_loss` == RewardTrainer.compute_loss.

Conservative DPO (`label_smoothing > 0`) is not compared with trl: trl 1.16's "sigmoid" loss ignores
label_smoothing, and the trl losses that read it ("robust", "exo_pair", "aot") are other losses. test_losses.py
checks cDPO against its formula by hand."""

import copy
import math

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from instructgpt_rlhf.dpo import pair_logprobs  # noqa: E402
from instructgpt_rlhf.losses import dpo_loss, reward_model_loss  # noqa: E402
from instructgpt_rlhf.model import ScalarHeadModel  # noqa: E402

from .conftest import tiny_llama  # noqa: E402

WORDS = [
    "the",
    "movie",
    "was",
    "film",
    "plot",
    "acting",
    "is",
    "a",
    "not",
    "great",
    "good",
    "bad",
    "awful",
    "fun",
    "boring",
    "dull",
    "brilliant",
    "and",
    "but",
    "very",
]
DATA = [
    {"prompt": "the movie was", "chosen": " great fun", "rejected": " boring"},
    {"prompt": "the plot is a", "chosen": " brilliant film and very good", "rejected": " dull film"},
    {"prompt": "acting", "chosen": " is good", "rejected": " is not good but awful and bad"},
    {"prompt": "a very", "chosen": " fun film", "rejected": " bad film but the acting is great"},
]


def hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return tok


def trainer_args(cls, tmp_path, **kw):
    return cls(
        output_dir=str(tmp_path),
        bf16=False,
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        per_device_train_batch_size=len(DATA),
        **kw,
    )


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.3)])
def test_dpo_loss_equals_trl_dpo_trainer(tmp_path, loss_type, beta):
    from trl import DPOConfig, DPOTrainer

    from x_llama.hf import XLlamaForCausalLM

    tok = hf_tokenizer()
    policy = tiny_llama(len(tok), seed=1)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # make the policy differ from the reference so the loss is not log 2
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_policy = XLlamaForCausalLM.from_llama(policy, eos_token_id=2, bos_token_id=1, pad_token_id=3)
    hf_ref = XLlamaForCausalLM.from_llama(ref, eos_token_id=2, bos_token_id=1, pad_token_id=3)
    args = trainer_args(DPOConfig, tmp_path, beta=beta, loss_type=[loss_type])
    trainer = DPOTrainer(model=hf_policy, ref_model=hf_ref, args=args, train_dataset=datasets.Dataset.from_list(DATA), processing_class=tok)
    rows = [trainer.train_dataset[i] for i in range(len(DATA))]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch)

    # ours: the same token ids, in our own batch layout (left-padded prompts), our log-probs and our loss
    pairs = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows]
    assert all(c[-1] == 2 and rj[-1] == 2 for _, c, rj in pairs)  # trl appended EOS; we keep it as a label
    with torch.no_grad():
        pc, pr = pair_logprobs(policy, pairs)
        rc, rr = pair_logprobs(ref, pairs)
    lengths = [torch.tensor([len(x[i]) for x in pairs]) for i in (1, 2)]
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    assert abs(float(ours) - math.log(2)) > 1e-3  # a non-trivial loss
    assert_close(ours, theirs.float(), atol=1e-6, rtol=0)


def test_reward_model_loss_equals_trl_reward_trainer(tmp_path):
    from trl import RewardConfig, RewardTrainer

    from x_llama.hf import XLlamaConfig, XLlamaForSequenceClassification

    tok = hf_tokenizer()
    rm = ScalarHeadModel(tiny_llama(len(tok), seed=2).config)
    torch.manual_seed(0)
    with torch.no_grad():
        rm.head.weight.normal_(0, 0.5)
        rm.head.bias.fill_(0.3)  # a bias cancels in r_w - r_l
    config = XLlamaConfig.from_llama_config(rm.config, num_labels=1, eos_token_id=2, bos_token_id=1, pad_token_id=3)
    hf_rm = XLlamaForSequenceClassification(config, llama=rm.backbone)
    with torch.no_grad():
        hf_rm.score.weight.copy_(rm.head.weight)
    data = [{"chosen": d["prompt"] + d["chosen"], "rejected": d["prompt"] + d["rejected"]} for d in DATA]
    trainer = RewardTrainer(
        model=hf_rm, args=trainer_args(RewardConfig, tmp_path), train_dataset=datasets.Dataset.from_list(data), processing_class=tok
    )
    rows = [trainer.train_dataset[i] for i in range(len(data))]
    batch = trainer.data_collator(rows)
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(batch))

    from instructgpt_rlhf.data import collate

    with torch.no_grad():  # ours: the whole text as the "completion" after an empty-prompt-free layout
        chosen = collate([r["chosen_ids"][:1] for r in rows], [r["chosen_ids"][1:] for r in rows])
        rejected = collate([r["rejected_ids"][:1] for r in rows], [r["rejected_ids"][1:] for r in rows])
        ours = reward_model_loss(rm.score(chosen.tokens, chosen.attention_mask), rm.score(rejected.tokens, rejected.attention_mask))
    assert abs(float(ours) - math.log(2)) > 1e-3  # a non-trivial loss
    assert_close(ours, theirs.float(), atol=1e-6, rtol=0)
