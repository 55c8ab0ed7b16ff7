# Every target installs what it is missing first (venv, pinned wheels, Debian packages), so on a
# fresh machine `make train-gradnorm` and `make test` are the only two commands needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= /usr/share/datasets/fashion-mnist
MODEL  ?=
INIT   ?=
ACT    ?=
EPOCHS ?=
BATCH  ?=
OUT    ?=
ARGS   ?=
# one of the paper's runs (recipes/paper.py), e.g. swinb_gradnorm, rn50_gelu_stage1; --key=value overrides
RECIPE ?=
# train.py's default output folder (data, model, objective, activation: one run per folder), asked of config.py
# because a recipe names the model; CKPT=official:PATH with MODEL=... evaluates a checkpoint the authors released
# A bad value prints one `error:` line (config.cli) and leaves RUN_DIR empty: NEED_CKPT then stops the target.
# Asked once (the $(eval) keeps the answer), however often CKPT is expanded.
RUN_DIR = $(eval RUN_DIR := $(shell $(PY) -c 'import sys, config; \
          sys.exit(config.cli(lambda a: print(config.parse_config(a).out), sys.argv[1:]))' \
          --data=$(DATA) --init= $(if $(RECIPE),--recipe=$(RECIPE)) $(if $(MODEL),--model=$(MODEL)) \
          $(if $(ACT),--act=$(ACT))))$(RUN_DIR)
CKPT   ?= $(if $(RUN_DIR),$(RUN_DIR)/ckpt.pt)
NEED_CKPT = @test -n '$(strip $(CKPT) $(CKPTS))' || exit 2
EPS    ?=
# AA=1: `make eval` also runs AutoAttack (standard version), the robust accuracy to report
AA     ?=
# multi-GPU / multi-node: torchrun (DDP; tools/torchrun.py: exit status 75 when preempted); else one process
GPUS        ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

ifeq ($(shell [ "0$(GPUS)" -gt 1 ] || [ "$(NNODES)" -gt 1 ] && echo multi),multi)
RUN := $(PY) -m tools.torchrun --nnodes=$(NNODES) --node_rank=$(NODE_RANK) --nproc_per_node=$(or $(filter-out 0,$(GPUS)),1) \
       --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)
else
RUN := $(PY)
endif
# unset variables leave train.py's defaults: the demo's, or the paper's Swin-B GradNorm run when DATA is ImageNet
TRAIN = $(RUN) train.py --data=$(DATA) $(if $(RECIPE),--recipe=$(RECIPE)) $(if $(ACT),--act=$(ACT)) \
        $(if $(MODEL),--model=$(MODEL)) $(if $(INIT),--init=$(INIT)) \
        $(if $(EPOCHS),--epochs=$(EPOCHS)) $(if $(BATCH),--batch_size=$(BATCH)) $(if $(OUT),--out=$(OUT)) $(ARGS)

.PHONY: setup data train train-gradnorm train-standard train-pgd train-fgsm train-edge eval test clean

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
ifneq ($(FFCV),0)
	dpkg -s $(FFCV_DEBS) >/dev/null 2>&1 || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $(FFCV_DEBS))
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-data.txt
endif
	touch $@

# The built-in default data: real Fashion-MNIST (MIT licence) from Debian's package.
data:
	@if [ "$(DATA)" = /usr/share/datasets/fashion-mnist ] && [ ! -e $(DATA)/t10k-labels-idx1-ubyte.gz ]; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist); fi

# the recipe's objective (make train RECIPE=swinb_pgd); train-X runs objective X
train: setup data
	$(TRAIN)
train-gradnorm: setup data
	$(TRAIN) --objective=gradnorm
train-standard: setup data
	$(TRAIN) --objective=standard
train-pgd: setup data
	$(TRAIN) --objective=pgd
train-fgsm: setup data
	$(TRAIN) --objective=fgsm
train-edge: setup data
	$(TRAIN) --objective=edge

eval: setup data
	$(NEED_CKPT)
	$(RUN) $(if $(filter official:%,$(CKPT)),-m tools.official --ckpt=$(patsubst official:%,%,$(CKPT)) --model=$(MODEL) \
	  --data=$(DATA) $(if $(ACT),--act=$(ACT)),evaluate.py --ckpt=$(CKPT)) $(if $(EPS),--eps $(EPS)) \
	  $(if $(filter 1,$(AA)),--autoattack,$(if $(filter 0,$(AA)),--no-autoattack)) $(ARGS)

# two pytest workers (the CI machine has 2 cores); work stealing keeps the slow subprocess tests from
# ending up on one worker
# ruff first (seconds); the line coverage of the top-level modules (pyproject.toml: [tool.coverage]) is
# printed at the end and fails the run below 85%
TEST_JOBS ?= 2
test: setup data
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist=worksteal --cov --cov-report=term --cov-fail-under=85 \
	  test_smoke.py tests

clean:
	rm -rf $(VENV) runs .pytest_cache __pycache__ .coverage .coverage.*

# ---------------------------------------------------------------- FFCV data path (data.py)
# FFCV=0 skips building FFCV in `setup` (then: the in-memory demo, or --loader=torchvision on ImageFolder data)
FFCV      ?= 1
FFCV_DEBS := pkg-config g++ libturbojpeg0-dev libopencv-dev
IMAGENET  ?=
BETON     ?= $(IMAGENET)-beton
MAX_SIDE  ?= 500
QUALITY   ?= 90
COMPRESS  ?= 0.5
VAL_SIDE  ?= 256
export NUMBA_THREADING_LAYER = omp

# ImageFolder IMAGENET/{train,val}/<class>/<image> -> BETON/{train,val}.beton; then train with DATA=$(BETON)
beton: setup
	@test -n "$(IMAGENET)" || (echo 'usage: make beton IMAGENET=/path/to/imagenet [BETON=out_dir]'; exit 2)
	$(PY) -m tools.beton $(IMAGENET) $(BETON) --max-side=$(MAX_SIDE) --quality=$(QUALITY) --compress=$(COMPRESS) --val-side=$(VAL_SIDE)

bench-loader: setup
	$(PY) -m tools.bench loader

# Step cost of standard, GradNorm (exact, finite-difference), EdgeReg, PGD-3 AT and FGSM-RS AT, side by side,
# as ratios to PGD-3 run the same way (a few minutes on a 2-core CPU). Each method runs as training runs it:
# compiled on CUDA, eager on the CPU. Default: the demo model on a batch of DATA, on the CPU; resnet50 and
# vit_small on random 224 px images (bf16) where there is a GPU and DATA is not given.
# ARGS=--compile=gradnorm adds compiled exact GradNorm and PGD-3 on the CPU (Inductor: minutes of compiling).
RES ?=
BENCH_MODELS = $(or $(MODEL),$(if $(filter-out 0,$(GPUS)),resnet50 vit_small,resnet_demo_pool))
BENCH_DATA = $(if $(and $(filter file,$(origin DATA)),$(filter-out 0,$(GPUS))),,$(DATA))
.PHONY: bench
bench: setup $(if $(BENCH_DATA),data)
	for m in $(BENCH_MODELS); do $(PY) -m tools.bench step --model=$$m --data=$(BENCH_DATA) $(if $(RES),--res=$(RES)) \
	  $(if $(BATCH),--batch=$(BATCH)) $(ARGS) || exit 1; done

# The CUDA path on a fresh GPU box in at most about 10 minutes (its steps' time limits add up to 600 s;
# ARGS=--skip=... for less), with the torch already there (nothing installed): CUDA tests, 1-process torchrun
# epochs (the demo; an ImageFolder with EMA and --resume=auto), the paper's Swin-B in float32 and bf16 (step
# costs, largest micro-batch, --accum), AutoAttack on a demo checkpoint (ARGS=--ckpt=...); ARGS=--all adds
# the fast conv's measurements (about 8 minutes more). No GPU: one line, exit 0.
.PHONY: check-gpu
check-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m tools.check_gpu $(ARGS)

# Gradient statistics, pictures and PGD accuracy of one or more checkpoints (CKPT, CKPT2, ... or CKPTS="a.pt b.pt").
.PHONY: characterize bench-attack
characterize: setup data
	$(NEED_CKPT)
	$(PY) -m tools.characterize $(or $(CKPTS),$(CKPT) $(CKPT2) $(CKPT3) $(CKPT4) $(CKPT5) $(CKPT6)) $(ARGS)
# PGD-10 seconds per 1,000 images on the demo model, eager vs torch.compile, side by side.
bench-attack: setup
	$(PY) -m tools.bench attack $(ARGS)
