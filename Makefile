# r1x on a fresh machine: two commands, each setting up whatever is missing first.
#
#   make pipeline    the main job: `r1x pipeline` on its embedded default (the R1 recipe)
#   make test        the test suite
#
# `make setup` alone installs the requirements (requirements-dev.txt; a torch already installed,
# e.g. a CUDA build, is kept) and builds r1x._C against that torch (an editable install). It
# runs again only when the requirements, the build files or the C++/CUDA sources change.

PYTHON ?= python3
SETUP_STAMP := build/.setup-stamp
BUILD_INPUTS := requirements-dev.txt pyproject.toml CMakeLists.txt \
	$(wildcard third_party/*.cmake build_tools/*) \
	$(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh csrc/cuda/*.cu)

.PHONY: setup pipeline test bench info clean

setup: $(SETUP_STAMP)

$(SETUP_STAMP): $(BUILD_INPUTS)
	@mkdir -p build
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "make setup: keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	  grep -v '^torch==' requirements-dev.txt > build/requirements-setup.txt; \
	else cp requirements-dev.txt build/requirements-setup.txt; fi
	$(PYTHON) -m pip install -q -r build/requirements-setup.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	@touch $@

pipeline: setup
	$(PYTHON) -m r1x.cli pipeline

test: setup
	$(PYTHON) -m pytest tests -q

bench: setup
	$(PYTHON) -m r1x.cli bench

info: setup
	$(PYTHON) -m r1x.cli info

clean:
	rm -rf build dist
