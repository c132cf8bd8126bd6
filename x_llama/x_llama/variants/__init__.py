"""The architecture lab: one file per technique paper, each an option of `LlamaConfig` (README, "The architecture
lab"). The defaults build Llama 2 exactly; `model.py` composes the pieces a config names:

| config field | value | file | paper |
|---|---|---|---|
| `position` | `alibi` | `alibi.py` | Press et al. 2022, Train Short, Test Long (ALiBi) |
| `position` | `nope` | `nope.py` | Kazemnejad et al. 2023, The Impact of Positional Encoding on Length Generalization |
| `attention` | `differential` | `differential_attention.py` | Ye et al. 2024, Differential Transformer |
| `ffn` | `moe` | `mixture_of_experts.py` | Shazeer et al. 2017; Fedus et al. 2021 (Switch); Jiang et al. 2024 (Mixtral); Zoph et al. 2022 (ST-MoE) |
| `ffn` | `peer` | `peer.py` | He 2024, Mixture of A Million Experts |
| `router` | `mod` | `mixture_of_depths.py` | Raposo et al. 2024, Mixture-of-Depths |
| `residual` | `hyper` | `hyper_connections.py` | Zhu et al. 2024, Hyper-Connections |

Adding a technique: a file here with the paper's equations in its docstring; a config field (or a value of one)
with its sub-section in `config.py`, validated; a branch in the factory of `model.py` (`make_attention`,
`make_feed_forward`, `make_hyper_connections`, `make_layer`) that imports the file lazily; a check against code we
did not write under tests/x_llama/variants/; a README section; a row in `x-llama ablate` (`ablate.VARIANTS`).
"""
