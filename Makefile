# The two entry points of README.md. Both create .venv on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

# Every version pip resolves is pinned by constraints.txt. Given as
# PIP_CONSTRAINT rather than -c: the variable also reaches the isolated
# environment pip builds the native module in (scikit-build-core, nanobind).
PIP := PIP_CONSTRAINT='$(CURDIR)/constraints.txt' $(VENV)/bin/pip

# Reinstall when the build inputs or the pins change: the native module is compiled here.
$(STAMP): pyproject.toml constraints.txt CMakeLists.txt $(wildcard native/*.cpp native/*.h)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	# torch pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job: one process pretrains the built-in byte-level language model
# for 300 steps (once; cached in ~/.cache/peerlearn), then 4 local peers train
# it on with DiLoCo for 500 steps each while one peer alone trains the same
# steps beside them (progress lines show the loss falling), then a summary:
# validation loss beside the lone peer's, tokens, bytes on the wire, compute
# utilisation.
run: $(STAMP)
	$(VENV)/bin/peerlearn demo --algo diloco --peers 4 --steps 500

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build
