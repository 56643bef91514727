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

.PHONY: all setup deps demo test lint bench clean kgre

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

lint: setup
	$(VENV)/bin/ruff check tpb tests bench fuzz

bench: setup
	$(SUDO) $(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info tpb/_tpb_c*.so tpb/_tpb_c.c

include fuzz/fuzz.mk
