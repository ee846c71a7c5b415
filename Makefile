# Every target works from a fresh clone: `make install` creates .venv at the repo root.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA ?= ../shared/esc50
MODEL ?= models/esc50-resnet34
EPOCHS ?= 20
TRAIN_ARGS ?=
VERIFY_CLIPS ?= 160
BENCH_ARGS ?=
EXTRAS ?= train,export,serve,loadtest,dev

.PHONY: help install install-serve test test-fast lint train train-smoke train-ddp evaluate \
        export export-trt verify serve bench loadtest docker-build docker-smoke compose-config clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)  ## create .venv with everything (torch CPU, ONNX, service, tests)
	$(PIP) install -q -e ".[$(EXTRAS)]"

install-serve: $(PY)  ## create .venv with the serving dependencies only (no torch)
	$(PIP) install -q -e ".[serve]"

test: install  ## run the test suite
	$(PY) -m pytest -q

test-fast: ## run the tests without reinstalling
	$(PY) -m pytest -q -x

lint:  ## ruff on everything, mypy on the service
	$(PY) -m ruff check train export service tests loadtests
	$(PY) -m mypy service

train:  ## the shipped recipe on $(DATA) with a held-out split; TRAIN_ARGS="--val-fraction 0" for all clips
	$(PY) -m train --data-root $(DATA) --epochs $(EPOCHS) --out-dir runs/esc50 --resume $(TRAIN_ARGS)

train-smoke:  ## a tiny 1-epoch training run, under a minute
	$(PY) -m train --data-root $(DATA) --folds 1 --max-clips 16 --epochs 1 --crop-seconds 1 \
		--out-dir runs/smoke

train-ddp:  ## 2-process DistributedDataParallel run on CPU (gloo), tiny
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m train --data-root $(DATA) --folds 1 \
		--max-clips 16 --epochs 1 --crop-seconds 1 --out-dir runs/ddp

evaluate:  ## evaluate the shipped checkpoint on labelled clips (FOLDS=...)
	$(PY) -m train evaluate $(MODEL).pt --data-root $(DATA) $(if $(FOLDS),--folds $(FOLDS))

export:  ## ONNX fp32 / fp16 / int8 from the shipped checkpoint
	$(PY) -m export onnx --checkpoint $(MODEL).pt --data-root $(DATA)

export-trt:  ## TensorRT FP16 engine from the fp16 ONNX (needs a GPU + TensorRT)
	$(PY) -m export tensorrt --onnx $(MODEL).fp16.onnx

verify:  ## parity of every artifact against PyTorch on real clips (held-out ones first)
	$(PY) -m export verify --checkpoint $(MODEL).pt --data-root $(DATA) --max-clips $(VERIFY_CLIPS)

serve:  ## run the service on 127.0.0.1:8000
	$(PY) -m service

bench:  ## raw engine vs service end-to-end, fp32 and int8 (BENCH_ARGS)
	$(PY) -m service.bench $(BENCH_ARGS)

loadtest:  ## Locust, headless, bounded, against a local service
	bash loadtests/run.sh

docker-build:  ## build the CPU image
	bash docker/build.sh

docker-smoke:  ## build, compose up, classify, scrape, compose down
	bash docker/smoke.sh

compose-config:  ## validate compose.yaml offline
	$(VENV)/bin/docker-compose config -q

clean:
	rm -rf runs reports .pytest_cache
