"""x_llama (skeleton)."""
