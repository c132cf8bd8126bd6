"""instructgpt_rlhf (skeleton)."""
