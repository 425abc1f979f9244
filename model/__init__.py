"""The model the service runs, in plain PyTorch: LightningDiT, VA-VAE, the sampler, latent statistics,
checkpoint I/O, the bundle format and offline generation (`python -m model.generate`).

Imports only third-party libraries and itself: never `engines`, `service` or `training`.
"""
