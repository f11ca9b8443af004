# ncdpo-rllib: `make train` and `make test` each set up .venv from scratch when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
NCDPO  := $(VENV)/bin/ncdpo
STAMP  := $(VENV)/.installed
CONFIG ?= configs/pendulum_ncdpo.yaml

.PHONY: help install train test test-fast test-images bench bench-finetune clean

help:
	@echo "make train   - set up .venv and run NCDPO on $(CONFIG) (MLflow: ./mlflow.db)"
	@echo "make test    - set up .venv and run the whole test suite (slow tests included)"
	@echo "make test-images - build the CPU image with buildah and train inside it (root; ~15 min)"
	@echo "make bench   - run the benchmarks (long; writes docs/benchmarks.md)"

$(STAMP): pyproject.toml requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first: the pinned CPU build, so nothing pulls a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(NCDPO) train $(CONFIG)

# Two test processes: most tests wait on subprocesses (Ray start-up, MLflow, the envs), so one
# pytest process keeps about one of CI's 2 cores busy. More workers on a bigger machine:
# make test TEST_WORKERS=8 (each Ray-using test needs ~1-2 GB of memory).
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -v -n $(TEST_WORKERS) --dist worksteal --durations=50

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m "not slow and not images"

# The images built for real (debootstrap base, docker/build.sh with buildah) and trained in (IMAGES="cpu cuda");
# not part of `make test` (cluster/README.md, "How the images are tested"). Installs buildah and debootstrap when missing.
IMAGES ?= cpu
test-images: $(STAMP)
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap)
	NCDPO_TEST_IMAGES="$(IMAGES)" $(PY) -m pytest -v -s -m images tests/test_images.py

# Full-size benchmarks (many hours on 2 cores: locomotion at 1M steps is ~27 runs of 5-10 min, Meta-World
# ~25 runs of 5 min); each script resumes from its results file and takes --help for smaller runs.
bench: $(STAMP)
	$(PY) benchmarks/throughput.py --env Pendulum-v1
	$(PY) benchmarks/throughput.py --env HalfCheetah-v5
	$(PY) benchmarks/sample_efficiency.py --config configs/pendulum_ncdpo.yaml --steps 160000
	$(PY) benchmarks/sample_efficiency.py --config configs/halfcheetah_ncdpo.yaml --steps 200000
	$(PY) benchmarks/scratch_suite.py --steps 300000 --seeds 0 1 2
	$(PY) benchmarks/grad_flow.py --env Pendulum-v1
	$(PY) benchmarks/grad_flow.py --env HalfCheetah-v5
	$(PY) benchmarks/scaling.py --config configs/halfcheetah_ncdpo.yaml --runners 0 1 2 --learners 0 1 2
	$(MAKE) bench-finetune
	$(PY) benchmarks/manipulation.py --tasks reach drawer_open door_open pick_place --obs state --seeds 0 1 2 --steps 300000

# Pre-train -> fine-tune on MuJoCo locomotion: collect (PPO expert), BC, then NCDPO vs DPPO (the frozen
# recipes) vs MLP PPO, 3 seeds at 1M env steps, and the K sweep on Hopper; learner cost of the
# fine-tuning architecture.
bench-finetune: $(STAMP)
	$(PY) benchmarks/throughput.py --env Hopper-v5 --ks 5 10 20 --algorithms ncdpo dppo --hidden 256 256 --action-chunk 4
	$(PY) benchmarks/latency_memory.py --env Hopper-v5 --ks 5 10 20 --hidden 256 256 --action-chunk 4 --experiment bench-finetune-Hopper-v5
	$(PY) benchmarks/finetune.py --envs hopper walker2d halfcheetah --steps 1000000 --seeds 0 1 2 --variants ncdpo dppo ppo
	$(PY) benchmarks/finetune.py --envs hopper --steps 300000 --seeds 0 --variants ncdpo:5 ncdpo:10 ncdpo:20 dppo:5 dppo:10 dppo:20 --section finetune-k:Hopper-v5 --results benchmarks/results/finetune_k.json

clean:
	rm -rf $(VENV) runs mlflow.db .pytest_cache
