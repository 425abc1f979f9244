.PHONY: demo-model

# Train the digits demo model from scratch (~10 min on 2 CPU cores) into checkpoints/demo/.
demo-model:
	.venv/bin/python -m model.demo --out checkpoints/demo --work runs/demo
