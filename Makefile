# TPB — the two commands a newcomer needs: `make demo` and `make test`.
# Both install what they need first (Debian packages, then a venv with TPB).

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.tpb-installed
SUDO      := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
DEB_PKGS  := python3 python3-venv python3-dev gcc libffi-dev iproute2 iputils-ping procps \
             nftables iperf3 tcpdump tshark netsniff-ng ethtool qemu-system-x86 \
             prometheus clang-14 libclang-rt-14-dev
PYTEST_ARGS ?=

.PHONY: all setup deps demo test test-asan lint bench clean kgre

all: setup

setup: deps $(STAMP)

# Only what is missing, so a machine that has everything is not touched.
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml setup.py tpb/build.py $(wildcard csrc/*.c csrc/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(SUDO) $(PY) -m tpb demo

# A Debian kernel with ip_gre, booted in qemu: the real Linux GRE peer of the
# interoperability tests (this machine's own kernel has no ip_gre).
kgre: deps
	$(SUDO) tests/kgre/build.sh

test: setup lint kgre
	$(SUDO) $(PY) -m pytest $(PYTEST_ARGS)

# The whole suite on a helper built with AddressSanitizer and
# UndefinedBehaviorSanitizer (gcc; TPB_SANITIZE=1 in tpb/build.py) into
# build/asan, which every Python process of the run loads instead of the
# production build (tests/asan/sitecustomize.py).  The ASan runtime must
# come first in a process: it is preloaded into Python, and only Python
# (sitecustomize hands it on to the Python processes a test starts, not to
# ip, qemu, prometheus...).  Python leaks by design: no leak detection.
# Any sanitizer report from any process fails the run, even one no test
# noticed.
ASAN_DIR := build/asan
test-asan: setup lint kgre
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)/reports
	TPB_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(ASAN_DIR)/lib \
	  --build-temp $(ASAN_DIR)/tmp 2>$(ASAN_DIR)/build.log || { cat $(ASAN_DIR)/build.log; exit 1; }
	@rc=0; $(SUDO) env TPB_C_DIR=$(CURDIR)/$(ASAN_DIR)/lib/tpb PYTHONPATH=$(CURDIR)/tests/asan \
	  LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  ASAN_OPTIONS=detect_leaks=0:log_path=$(CURDIR)/$(ASAN_DIR)/reports/asan \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(CURDIR)/$(ASAN_DIR)/reports/ubsan \
	  $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ -n "$$(ls -A $(ASAN_DIR)/reports)" ]; then \
	  echo "test-asan: sanitizer reports in $(ASAN_DIR)/reports:"; head -c 20000 $(ASAN_DIR)/reports/*; rc=1; \
	fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check tpb tests bench fuzz

bench: setup
	$(SUDO) $(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info tpb/_tpb_c*.so tpb/_tpb_c.c

include fuzz/fuzz.mk
