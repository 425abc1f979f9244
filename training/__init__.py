"""Everything that exists only to train: objectives and losses, EMA, data loading and latent
extraction, the DiT and VA-VAE trainers, the digits demo recipe and its evaluation.

May import `model`; nothing in `model`, `engines` or `service` imports it.
"""
