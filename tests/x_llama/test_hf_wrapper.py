"""The transformers wrapper: Auto* registration, save/load, the backbone trl reads, shared weights, HF generate."""

from __future__ import annotations

import torch
import transformers
from torch.testing import assert_close

from x_llama import generate
from x_llama.hf import XLlamaConfig, XLlamaForCausalLM, XLlamaForSequenceClassification


def test_wrapper_shares_weights_and_exposes_what_trl_needs(tiny_model):
    wrapper = XLlamaForCausalLM.from_llama(tiny_model)
    assert wrapper.llama is tiny_model
    assert wrapper.get_output_embeddings() is tiny_model.output
    assert wrapper.get_input_embeddings() is tiny_model.tok_embeddings
    assert XLlamaConfig.auto_map == {}
    tokens = torch.randint(0, tiny_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, 6:] = 0  # right padding, as trl's collators produce
    with torch.no_grad():
        backbone = getattr(wrapper, wrapper.base_model_prefix)(input_ids=tokens, attention_mask=mask, use_cache=False)
        assert_close(backbone.last_hidden_state, tiny_model.hidden_states(tokens, attention_mask=mask))
        output = wrapper(input_ids=tokens, attention_mask=mask)
        assert_close(output.logits[0], tiny_model(tokens)[0])
        assert_close(output.logits[1, :6], tiny_model(tokens[1:, :6])[0], atol=1e-5, rtol=0)
    labels = tokens.clone()
    loss = wrapper(input_ids=tokens, labels=labels).loss
    expected = torch.nn.functional.cross_entropy(tiny_model(tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert_close(loss, expected)


def test_auto_classes_save_and_load(tmp_path, tiny_model):
    XLlamaForCausalLM.from_llama(tiny_model).save_pretrained(tmp_path)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, XLlamaConfig) and config.model_type == "x_llama" and config.hidden_size == tiny_model.config.dim
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, XLlamaForCausalLM)
    tokens = torch.randint(0, tiny_model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(loaded(input_ids=tokens).logits, tiny_model(tokens), atol=0, rtol=0)


def test_hf_generate_equals_ours(tiny_model):
    wrapper = XLlamaForCausalLM.from_llama(tiny_model, eos_token_id=None)
    prompt = [1, 4, 9, 16]
    theirs = wrapper.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert theirs[0, 4:].tolist() == generate(tiny_model, [prompt], 10)[0]


def test_sequence_classifier_reads_the_last_real_token(tiny_model):
    config = XLlamaConfig.from_llama_config(tiny_model.config, num_labels=1)
    scorer = XLlamaForSequenceClassification(config, llama=tiny_model).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0], [0, 0, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right- and left-padded copies of the same text
    with torch.no_grad():
        scores = scorer(input_ids=tokens, attention_mask=mask).logits
        alone = scorer.score(tiny_model.hidden_states(torch.tensor([[5, 6, 7]])))[0, -1]
    assert scores.shape == (2, 1)
    assert_close(scores[0], alone, atol=1e-5, rtol=0)
    assert_close(scores[1], alone, atol=1e-5, rtol=0)
