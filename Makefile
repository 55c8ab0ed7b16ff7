# Every target installs what it is missing first (venv, pinned wheels, Debian packages), so on a
# fresh machine `make train-gradnorm` and `make test` are the only two commands needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= /usr/share/datasets/fashion-mnist
MODEL  ?= resnet_demo
ACT    ?= gelu
EPOCHS ?=
BATCH  ?=
OUT    ?= runs
ARGS   ?=
CKPT   ?= $(OUT)/gradnorm_$(ACT)/ckpt.pt
EPS    ?= 0.05 0.1 0.15
# multi-GPU / multi-node: torchrun (DDP); one process otherwise, same code path
GPUS        ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

ifeq ($(shell [ "0$(GPUS)" -gt 1 ] || [ "$(NNODES)" -gt 1 ] && echo multi),multi)
RUN := $(VENV)/bin/torchrun --nnodes=$(NNODES) --node_rank=$(NODE_RANK) --nproc_per_node=$(GPUS) \
       --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT)
else
RUN := $(PY)
endif
TRAIN = $(RUN) gradnorm.py --model=$(MODEL) --act=$(ACT) --data=$(DATA) \
        $(if $(EPOCHS),--epochs=$(EPOCHS)) $(if $(BATCH),--batch_size=$(BATCH)) $(ARGS)

.PHONY: setup data train-gradnorm train-standard train-pgd train-edge eval test clean

setup: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

# The built-in default data: real Fashion-MNIST (MIT licence) from Debian's package.
data:
	@if [ "$(DATA)" = /usr/share/datasets/fashion-mnist ] && [ ! -e $(DATA)/t10k-labels-idx1-ubyte.gz ]; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist); fi

train-gradnorm: setup data
	$(TRAIN) --objective=gradnorm --out=$(OUT)/gradnorm_$(ACT)
train-standard: setup data
	$(TRAIN) --objective=standard --out=$(OUT)/standard_$(ACT)
train-pgd: setup data
	$(TRAIN) --objective=pgd --out=$(OUT)/pgd_$(ACT)
train-edge: setup data
	$(TRAIN) --objective=edge --out=$(OUT)/edge_$(ACT)

eval: setup data
	$(PY) attack.py --ckpt=$(CKPT) --eps $(EPS) $(ARGS)

test: setup data
	$(PY) -m pytest -q -x test_smoke.py

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache __pycache__
