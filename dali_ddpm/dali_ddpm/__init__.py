"""dali_ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) from scratch: the UNet, the forward process,
the DDPM and DDIM samplers, the variational bound in bits/dim and FID-C, trained on Fashion-MNIST. See README.md."""
