# ld3m: `make run` distils Fashion-MNIST with DM and evaluates it; `make test` runs the tests.
# Both set everything up first on a fresh Debian machine (venv, package, dataset).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ld3m-installed
FMNIST_SYSTEM := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# where ld3m keeps datasets: $LD3M_DATA_DIR, else the user cache (one copy per machine and user)
DATA_DIR := $(or $(LD3M_DATA_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ld3m/datasets)
RUN_DIR ?= runs/default

.PHONY: setup data run test bench lint clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

data:
	@if [ -f $(FMNIST_SYSTEM) ] || [ -f $(DATA_DIR)/FashionMNIST/raw/train-images-idx3-ubyte ]; then \
		echo "Fashion-MNIST: found"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Fashion-MNIST: installing the Debian package dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing. Run: sudo apt-get install dataset-fashion-mnist"; \
		echo "(or put the four IDX files in $(DATA_DIR)/FashionMNIST/raw/)"; exit 1; \
	fi

# A second `make run` keeps the first run's files: its own go to lightning_logs/version_N, and the
# summary below shows the newest run's.
run: setup
	$(VENV)/bin/ld3m fit --trainer.default_root_dir $(RUN_DIR)
	@out=$$(dirname "$$(ls -t $(RUN_DIR)/evaluation.md $(RUN_DIR)/lightning_logs/version_*/evaluation.md 2>/dev/null | head -n 1)"); \
	echo; echo "Distilled set: $$out/synthetic.safetensors  images: $$out/images/final.png"; \
	echo "ConvNet test accuracy (%), mean +- std over runs:"; cat "$$out/evaluation.md"

test: setup
	$(PY) -m pytest -q --durations=15

bench: setup
	$(PY) bench/dm_speed.py

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs lightning_logs .pytest_cache
