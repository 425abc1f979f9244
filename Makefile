PYTHON ?= $(shell test -x .venv/bin/python && echo .venv/bin/python || echo python)

.PHONY: demo-model

# Train the digits demo model from scratch (VA-VAE, latents, LightningDiT; about
# 10-15 min on 2 shared CPU cores) and write the bundle to checkpoints/demo/.
demo-model:
	$(PYTHON) -m training.demo --out checkpoints/demo --work runs/demo

.PHONY: bench bench-full

# The benchmark report's numbers in one command (quick modes, a few minutes on 2 cores);
# outputs under bench/out/ and loadtest/out/. bench-full is what docs/benchmarks.md quotes.
bench:
	$(PYTHON) bench/engines.py --quick
	$(PYTHON) bench/compare.py --quick --out bench/out
	$(PYTHON) bench/batching.py --quick --out bench/out
	$(PYTHON) loadtest/run.py --quick

bench-full:
	$(PYTHON) bench/engines.py --quick --write-docs
	$(PYTHON) bench/compare.py --b1-engines torch-fp32,torch-bf16 --overhead-rounds 2 --out bench/out
	$(PYTHON) bench/batching.py --requests 200 --max-rows 16 --out bench/out --plot docs/img/batching.png
	$(PYTHON) loadtest/run.py --quick --service-env LDIT_MAX_BATCH_SIZE=16
