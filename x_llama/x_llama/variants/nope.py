"""NoPE: no positional encoding (Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
Generalization in Transformers").

The paper's observation (section 3 and Theorem 1): a decoder-only Transformer needs no explicit position
signal, because the causal mask already breaks permutation symmetry. Query i attends over the prefix 1..i only, so
a first layer can recover absolute position (for example by attending uniformly and reading 1/i off a constant
key) and relative positions follow. The paper finds NoPE length-generalises at least as well as RoPE and ALiBi
on its synthetic tasks.

In x_llama (`LlamaConfig.position = "nope"`) this is the absence of code: `Llama.hidden_states` builds no RoPE
tables (`AttentionInputs.cos = sin = None`) and no bias, and `Attention` skips the rotation. What remains is
testable: without position signal, the output at the last position of a causal model cannot depend on the order
of the tokens before it (tests/x_llama/variants/test_variant_position.py), a property RoPE and ALiBi both break.
"""
