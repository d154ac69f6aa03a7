# The two entry points of README.md. Both create .venv on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

# Reinstall when the build inputs change: the native module is compiled here.
$(STAMP): pyproject.toml CMakeLists.txt $(wildcard native/*.cpp native/*.h)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	# torch pinned to the CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job. Until the swarm lands this runs the data-plane benchmarks.
run: $(STAMP)
	$(VENV)/bin/peerlearn bench codec --json
	$(VENV)/bin/peerlearn bench stream --json

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build
