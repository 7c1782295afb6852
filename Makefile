# The two commands of the README. Both create .venv if missing and install into it.
# torch is installed first and on its own, so the project's `torch>=2.2` is already satisfied and pip
# never pulls a multi-GB CUDA build on a CPU machine. GPU users override it, e.g.
#   make demo TORCH_SPEC="torch==2.5.1" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= eval,app,data,dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.concept-erase-installed

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/concept-erase demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
