# Two commands on a fresh machine: `make run` (the main job) and `make test` (the test suite).
# Both first build .venv once: Debian's Fashion-MNIST files, the CPU build of torch (a bare `torch`
# requirement would pull a multi-GB CUDA wheel), then this project with its test extra.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# Where this workplace keeps the CPU wheel of torch (pip also finds it via PIP_FIND_LINKS); elsewhere
# pip takes torch from its index as usual.
LOCAL_WHEELS := $(wildcard /opt/wheels)

.PHONY: install run test benchmark
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -d $(FASHION_MNIST) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "could not install dataset-fashion-mnist (needs root): recipes will use the Hub copy when online"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(if $(LOCAL_WHEELS),--find-links $(LOCAL_WHEELS)) "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# The main job on the offline default: the embedded self-pretrained ViT, Fashion-MNIST, keep=0.6.
run: install
	$(BIN)/python recipes/finetune.py --output_dir outputs/vit-tiny-fashion-mnist-tokenpool --overwrite_output_dir --max_train_steps 300

test: install
	$(BIN)/python -m pytest -q

# The default sweep (docs/results.md): every method, keep 0.5-0.8 and FLOPs budgets, checkpoints and shapes.
benchmark: install
	$(BIN)/python recipes/benchmark.py --output_dir docs/results/sweep
