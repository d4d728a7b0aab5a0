"""Mix-scale block-diffusion fine-tuning: the NELBO objective, EMA, and the accelerate training loop."""
