"""dali_ddpm (skeleton)."""
