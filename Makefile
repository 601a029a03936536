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

# The figures of docs/results.md and docs/fidelity.md (run on an otherwise idle machine).
benchmark: install
	$(BIN)/python recipes/benchmark.py --suite shapes --keeps 0.6 --schedules r-13 --target_flops --output_dir docs/results/sweep-shapes
	$(BIN)/python recipes/benchmark.py --suite shapes --shapes dinov2-s14-518 dinov2-reg-s14-518 --keeps 0.6 --schedules r-13 --target_flops --output_dir docs/results/sweep-dinov2
	$(BIN)/python recipes/benchmark.py --suite shapes --shapes dinov2-s14-518 dinov2-reg-s14-518 --methods tokenpool kmeans topk --keeps 0.6 --target_flops --output_dir docs/results/sweep-dinov2-final
	$(BIN)/python recipes/benchmark.py --suite shapes --shapes deit-s16-224 vit-b16-224 --keeps 0.6 --schedules r-13 --target_flops --floor --output_dir docs/results/sweep-floor
	$(BIN)/python recipes/benchmark.py --suite shapes --shapes swin-t-224 swinv2-t-256 --keeps 0.6 --target_flops --floor --output_dir docs/results/sweep-swin
	$(BIN)/python recipes/benchmark.py --suite checkpoints --keeps 0.5 0.6 0.7 --schedules r-8 --target_flops 0.5 --output_dir docs/results/sweep-checkpoints
	$(BIN)/python recipes/benchmark.py --suite reducer_cost --output_dir docs/results/reducer-cost
	$(BIN)/python recipes/fidelity.py --methods tokenpool kmeans tome --output_dir docs/results/fidelity
