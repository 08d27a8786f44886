# Entry points. `make help` lists them; every target builds the venv first if it is missing.
PY      := .venv/bin/python
DATA    ?= celeba
SEED    ?= 0
SEEDS   ?= 0 1 2 3 4
CONFIG  ?= recipe
N_LABELED ?= 250
# the run that `make evaluate` / `make attention` read (e.g. RUN=runs/demo, RUN=runs/sweep/seed1)
RUN     ?= runs/seed$(SEED)
# ssl-table: synthetic faces labelled by gender (built on first use), 250 labels, the small CNN on the CPU
SSL_DATA ?= ssl
SSL_LABELED ?= 250
SSL_ARGS ?= --config=cpu_small
ARGS    ?=
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev

.DEFAULT_GOAL := help
.PHONY: help setup test lint data demo demo-groups train sweep evaluate attention mixmatch mixmatch-show ssl-table robust-table bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: DATA=$(DATA) SEED=$(SEED) SEEDS=\"$(SEEDS)\" CONFIG=$(CONFIG) RUN=$(RUN) N_LABELED=$(N_LABELED) SSL_DATA=$(SSL_DATA) SSL_LABELED=$(SSL_LABELED) ARGS=\"--key=value ...\""

setup: .venv/.done  ## make .venv from nothing (system packages for FFCV, then pip)

.venv/.done: requirements.txt requirements-dev.txt
	@if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing FFCV's build dependencies: $(APT_PKGS)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PKGS) >/dev/null; \
	  else \
	    echo "FFCV needs system packages; run:  sudo apt-get install -y --no-install-recommends $(APT_PKGS)"; exit 1; \
	  fi; \
	fi
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	$(PY) -c "import ffcv, torch; print('setup ok: torch', torch.__version__, '| ffcv imports')"
	touch $@

test: setup  ## run the test suite (4.5 to 5 minutes on 2 idle CPU cores)
	$(PY) -m pytest

lint: setup  ## ruff
	.venv/bin/ruff check .

data: setup  ## build data/$(DATA) (celeba by default; DATA=synthetic works offline)
	$(PY) data.py $(DATA) --out data/$(DATA) $(ARGS)

demo: setup data/demo/meta.json  ## offline end-to-end run on the synthetic set: data, train, evaluate, attention maps
	$(PY) train_vit.py --config=demo --data=data/demo --out_dir=runs/demo --force $(ARGS)
	$(PY) evaluate.py --ckpt runs/demo/best.safetensors --data data/demo --split test --out runs/demo/eval --card
	$(PY) attention.py --ckpt runs/demo/best.safetensors --data data/demo --split test --n 8 --out runs/demo/attention

demo-groups: setup data/tones/meta.json  ## offline, 5 groups: skin-tone bins (one rare, dim); evaluate by tone and gender x tone
	$(PY) train_vit.py --config=demo --data=data/tones --out_dir=runs/tones --force $(ARGS)
	$(PY) evaluate.py --ckpt runs/tones/best.safetensors --data data/tones --split test --out runs/tones/eval
	$(PY) evaluate.py --ckpt runs/tones/best.safetensors --data data/tones --split test --group_by=Male,Skin \
	  --out runs/tones/eval_gender_tone

train: setup  ## train the original solution's recipe (CONFIG=recipe; a GPU job) on data/$(DATA) into runs/seed$(SEED)
	$(PY) train_vit.py --config=$(CONFIG) --data=data/$(DATA) --seed=$(SEED) --out_dir=runs/seed$(SEED) $(ARGS)

sweep: setup  ## train SEEDS="0 1 2" into runs/sweep/seed<N> and write runs/sweep/sweep.md (mean +- std)
	$(PY) train_vit.py --sweep="$(SEEDS)" --config=$(CONFIG) --data=data/$(DATA) $(ARGS)

evaluate: setup  ## score $(RUN)/best.safetensors on the test split of data/$(DATA) -> $(RUN)/eval
	$(PY) evaluate.py --ckpt $(RUN)/best.safetensors --data data/$(DATA) --split test --out $(RUN)/eval

attention: setup  ## attention maps of $(RUN)/best.safetensors on data/$(DATA) -> $(RUN)/attention
	$(PY) attention.py --ckpt $(RUN)/best.safetensors --data data/$(DATA) --split val --n 16 --out $(RUN)/attention

mixmatch: setup  ## MixMatch on data/$(DATA) with N_LABELED labels
	$(PY) train_mixmatch.py --data=data/$(DATA) --n_labeled=$(N_LABELED) --seed=$(SEED) --out_dir=runs/mixmatch_$(DATA)_$(N_LABELED)_s$(SEED) $(ARGS)

mixmatch-show: setup data/$(SSL_DATA)/meta.json  ## one MixMatch step drawn offline (batch, guesses, mixup, lambda') -> runs/mixmatch_show.png
	$(PY) train_mixmatch.py --data=data/$(SSL_DATA) --n_labeled=$(SSL_LABELED) $(SSL_ARGS) --show=runs/mixmatch_show.png $(ARGS)

ssl-table: setup data/$(SSL_DATA)/meta.json  ## supervised / MixMatch / MixMatch without mixup / full, 3 seeds -> runs/ssl_table/ssl_table.md
	$(PY) train_mixmatch.py --table --data=data/$(SSL_DATA) --n_labeled=$(SSL_LABELED) --out_dir=runs/ssl_table $(SSL_ARGS) $(ARGS)

# robust-table: data/robust (synthetic Blond_Hair x Male, built on first use) unless DATA is given on the command line
ROBUST_DATA := $(if $(filter command line,$(origin DATA)),$(DATA),robust)
ROBUST_OUT  := $(if $(filter command line,$(origin DATA)),runs/robust_$(DATA),runs/robust)
ROBUST_ARGS ?= --config=robust

robust-table: setup data/$(ROBUST_DATA)/meta.json  ## debiasing methods x 3 seeds -> runs/robust/robust_table.md (ARGS=--quick: 2 min)
	$(PY) robust.py --table=robust $(ROBUST_ARGS) --data=data/$(ROBUST_DATA) --out_dir=$(ROBUST_OUT) $(ARGS)

bench: setup  ## speed benchmarks -> runs/bench.md, runs/bench.json (ARGS=--quick for a short CPU run)
	$(PY) bench.py $(ARGS)

gpu-check: setup  ## the GPU acceptance: CUDA tests, bench at 80/224, a recipe epoch at CelebA size, DDP -> runs/gpu_check.md
	$(PY) gpu_check.py $(ARGS)

# the offline synthetic sets, built on first use (the .venv/.done prerequisite is order-only: no rebuild on setup)
data/demo/meta.json: | .venv/.done
	$(PY) data.py synthetic --n 12000 --out data/demo

data/tones/meta.json: | .venv/.done
	$(PY) data.py synthetic --n 12000 --skin_tones=5 --group=Skin --out data/tones

data/robust/meta.json: | .venv/.done  # Blond_Hair x Male with CelebA's rare cell (blond men, 1%), 40x40
	$(PY) data.py synthetic --n=20000 --size=40 --criterion=Blond_Hair --group=Male --cells=0.44,0.14,0.41,0.01 \
	  --glasses_share=0 --both=0 --noise=0 --split=0.5,0.25,0.25 --out=data/robust

data/celeba_blond/meta.json: | .venv/.done
	$(PY) data.py celeba --criterion Blond_Hair --group Male --out data/celeba_blond

data/ssl/meta.json: | .venv/.done  # stored at 40x40, the size ssl-table trains at: augmentation on 4x fewer pixels
	$(PY) data.py synthetic --n 12000 --size 40 --target Male --group none --out data/ssl

clean:  ## remove caches only (__pycache__, pytest's and ruff's); never data/, runs/ (checkpoints) or .venv
	rm -rf __pycache__ tests/__pycache__ .venv/.pytest_cache .venv/.ruff_cache
