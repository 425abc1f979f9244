PYTHON ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python)

.PHONY: demo-model

# Train the digits demo model from scratch (VA-VAE, latents, LightningDiT; about
# 10-15 min on 2 shared CPU cores) and write the bundle to checkpoints/demo/.
demo-model:
	$(PYTHON) -m model.demo --out checkpoints/demo --work runs/demo
