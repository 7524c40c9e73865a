# protlm-jax: every target sets up .venv itself (Python 3.11, pinned by constraints.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_DIR ?= /tmp/protlm-demo
# The family the demo trains: prot_t5_tiny, prot_bert_tiny, prot_albert_tiny, prot_electra_tiny,
# prot_xlnet_tiny, prot_txl_tiny.
DEMO_MODEL ?= prot_t5_tiny
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: all venv data sysdeps demo test bench clean

all: test

$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	$(PIP) install --quiet -c constraints.txt -e '.[test,bench]' > $(VENV)/install.log 2>&1 \
	  || { grep -v "^WARNING: Location" $(VENV)/install.log | tail -40; exit 1; }
	$(PY) -c "import protlm_jax.cli, seqio, jax, apache_beam, protlm_tasks"
	touch $(STAMP)

venv: $(STAMP)

# Real data sets, pinned and sha256-checked (data/README.md).
data: $(STAMP)
	$(VENV)/bin/protlm data fetch --dataset all

demo: $(STAMP) data
	$(PY) examples/demo.py --workdir $(DEMO_DIR) --model $(DEMO_MODEL)

# Debian packages the tests use: Chromium opens `protlm analyze`'s HTML headless
# (a screenshot); shellcheck lints tpu_scripts/. Installed once with apt-get (as
# root, or through sudo).
SYSDEPS := chromium shellcheck
sysdeps:
	@{ command -v chromium && command -v shellcheck; } > /dev/null || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  echo "installing Debian packages: $(SYSDEPS)"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    $$SUDO apt-get install -y -qq --no-install-recommends $(SYSDEPS) > /dev/null; }

# The notebooks run in a real Jupyter kernel (nbmake), in smoke mode.
test: $(STAMP) data sysdeps
	PROTLM_SMOKE=1 $(PY) -m pytest tests notebooks --nbmake -q -n 2 --dist loadfile

bench: $(STAMP) data
	$(PY) benchmarks/data_pipeline.py
	$(PY) benchmarks/train_step.py
	XLA_FLAGS= $(PY) benchmarks/embed.py

clean:
	rm -rf $(VENV) *.egg-info build
