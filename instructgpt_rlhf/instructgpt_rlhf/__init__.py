"""instructgpt_rlhf: InstructGPT-style alignment of x_llama models (SFT, reward model, PPO(-ptx), DPO) on the DPO
paper's controlled-sentiment task. See README.md."""
