# TPB — the two commands a newcomer needs: `make demo` and `make test`.
# Both install what they need first (Debian packages, then a venv with TPB).
# `make install` puts TPB on this machine as a service (appliance/README.md);
# `make image` builds the bootable appliance image (image/README.md).

VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.tpb-installed
SUDO      := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
DEB_PKGS  := python3 python3-venv python3-dev gcc libffi-dev iproute2 iputils-ping procps \
             nftables iperf3 tcpdump tshark netsniff-ng ethtool qemu-system-x86 \
             systemd systemd-container prometheus qemu-utils ovmf dnsmasq-base \
             clang-14 libclang-rt-14-dev conntrack
# What `make install` needs on the machine it installs on: to build the C
# helper into the venv, and what TPB runs (ip, nft).
INSTALL_PKGS := python3 python3-venv python3-dev gcc libffi-dev iproute2 nftables
# What `make image` needs besides what `make install` needs (it runs it).
IMAGE_PKGS := mmdebstrap e2fsprogs dosfstools mtools fdisk
PYTEST_ARGS ?=
SOAK_SECONDS ?= 600

.PHONY: all setup deps install-deps demo test test-asan lint bench soak clean kgre install uninstall \
        image image-deps test-image wheel

all: setup

setup: deps $(STAMP)

# $(call apt-install,PACKAGES): only what is missing, so a machine that has
# everything is not touched.
define apt-install
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "make: installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call apt-install,$(DEB_PKGS))

install-deps:
	$(call apt-install,$(INSTALL_PKGS))

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

test: setup lint kgre image
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

# Mixed traffic and attacks for SOAK_SECONDS (default 600): RSS, descriptors,
# reassembly memory and the frame balance every 10 s (tests/soak.py). Not
# part of `make test`; run it alone on the machine.
soak: setup
	$(SUDO) env SOAK_SECONDS=$(SOAK_SECONDS) $(PY) tests/soak.py

clean:
	rm -rf $(VENV) build dist *.egg-info tpb/_tpb_c*.so tpb/_tpb_c.c image/out

# ---- make image / make test-image --------------------------------------------
# The appliance's disk image, image/out/tpb.img: Debian 12 with the kernel of
# bookworm-backports, systemd-boot, TPB installed by `make install
# DESTDIR=...` (image/README.md). A second run with the same sources says "up
# to date". Settings (TPB_IMAGE_IN_MATCH=..., see image/build.sh) on the
# command line: `make image TPB_IMAGE_IN_MATCH=MACAddress=00:11:22:33:44:55`.
IMAGE_VARS := TPB_IMAGE_IN_MATCH TPB_IMAGE_OUT_MATCH TPB_IMAGE_MGMT_MATCH TPB_IMAGE_ROOT_SIZE \
              TPB_IMAGE_ROOT_PASSWORD TPB_IMAGE_KERNEL TPB_IMAGE_MIRROR TPB_IMAGE_SECURITY_MIRROR \
              TPB_IMAGE_OUT TPB_IMAGE_CACHE

image-deps:
	$(call apt-install,$(IMAGE_PKGS) $(INSTALL_PKGS))

image: image-deps
	$(SUDO) env $(foreach v,$(IMAGE_VARS),$(if $($(v)),$(v)='$($(v))')) image/build.sh

# TPB and its dependencies as wheels in dist/, built with Debian's python3 like
# `make install` (the C helper compiled for Debian 12's Python 3.11): to
# update TPB on an installed appliance (image/README.md, "Updating").
wheel: install-deps
	rm -rf dist build/wheel-venv
	$(SYSTEM_PYTHON) -m venv build/wheel-venv
	env PIP_DISABLE_PIP_VERSION_CHECK=1 build/wheel-venv/bin/pip wheel -q -w dist .
	@ls dist

# The image booted under qemu (TCG) and tested: tests/test_image.py.
test-image: setup image
	$(SUDO) $(PY) -m pytest $(PYTEST_ARGS) tests/test_image.py

# ---- make install / make uninstall -------------------------------------------
# The layout the units in appliance/ expect (their ExecStart= is
# /opt/tpb/bin/tpb): installed from this checkout, as root.
#   /opt/tpb                        a venv: TPB (C helper built) and its dependencies
#   /usr/local/bin/tpb              -> /opt/tpb/bin/tpb
#   $(UNITDIR)                      tpb.service, tpb@.service, tpb-pop.service
#   $(SYSUSERSDIR)/tpb.conf         the user tpb the services run as
#   $(UDEVRULESDIR)/70-tpb.rules    /dev/cpu_dma_latency for group tpb
#   /usr/local/share/tpb            the appliance README, the default configurations,
#                                   the Grafana dashboard
#   /etc/tpb                        tpb.toml and tpb-pop.toml, only where absent
# Nothing is enabled or started. DESTDIR=/abs/path installs into an image
# instead (its systemd-sysusers and udev do their part at its first boot; the
# venv is moved into place by rewriting its scripts' paths, so the image needs
# the same Debian release's python3, plus iproute2 and nftables).
# The units name /opt/tpb, /usr/local/share/tpb and /etc/tpb: those are fixed.
TPB_HOME     := /opt/tpb
SHAREDIR     := /usr/local/share/tpb
CONFDIR      := /etc/tpb
BINDIR       := /usr/local/bin
UNITDIR      ?= /usr/local/lib/systemd/system
SYSUSERSDIR  ?= /usr/local/lib/sysusers.d
UDEVRULESDIR ?= /usr/local/lib/udev/rules.d
UNITS        := appliance/tpb.service appliance/tpb@.service appliance/tpb-pop.service
CONFIGS      := appliance/tpb.toml appliance/tpb-pop.toml
SHARED       := appliance/README.md $(CONFIGS) appliance/grafana/tpb-dashboard.json
# systemd runs this machine (sd_booted(3)), and this is not an image build.
LIVE         := $(if $(DESTDIR),,$(shell [ -d /run/systemd/system ] && echo yes))
# Debian's interpreter, never one first on PATH (pyenv...): the venv names it
# and the image has it.
SYSTEM_PYTHON := /usr/bin/python3
PIP          := env PIP_DISABLE_PIP_VERSION_CHECK=1 $(DESTDIR)$(TPB_HOME)/bin/python -m pip

install: install-deps
	@case "$(DESTDIR)" in ""|/*) ;; *) echo "make: DESTDIR must be an absolute path"; exit 2;; esac
	test -x $(DESTDIR)$(TPB_HOME)/bin/python || $(SYSTEM_PYTHON) -m venv $(DESTDIR)$(TPB_HOME)
	$(PIP) install -q .
ifneq ($(DESTDIR),)
	@# The venv's scripts name its interpreter by the path it was built at.
	grep -rlIF "$(abspath $(DESTDIR)$(TPB_HOME))" $(DESTDIR)$(TPB_HOME)/bin $(DESTDIR)$(TPB_HOME)/pyvenv.cfg \
	  | xargs -r sed -i "s|$(abspath $(DESTDIR)$(TPB_HOME))|$(TPB_HOME)|g"
endif
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) \
	  $(DESTDIR)$(UDEVRULESDIR) $(DESTDIR)$(SHAREDIR) $(DESTDIR)$(CONFDIR)
	ln -sfn $(TPB_HOME)/bin/tpb $(DESTDIR)$(BINDIR)/tpb
	install -m 0644 $(UNITS) $(DESTDIR)$(UNITDIR)/
	install -m 0644 appliance/tpb.sysusers $(DESTDIR)$(SYSUSERSDIR)/tpb.conf
	install -m 0644 appliance/70-tpb.rules $(DESTDIR)$(UDEVRULESDIR)/70-tpb.rules
	install -m 0644 $(SHARED) $(DESTDIR)$(SHAREDIR)/
	@# An operator's configuration is never overwritten.
	@for f in $(CONFIGS); do \
	  dst=$(DESTDIR)$(CONFDIR)/$$(basename $$f); \
	  if [ -e $$dst ] || [ -L $$dst ]; then \
	    echo "make: $$dst exists: kept (the new default is $(SHAREDIR)/$$(basename $$f))"; \
	  else \
	    echo "install -m 0644 $$f $$dst"; install -m 0644 $$f $$dst; \
	  fi; \
	done
ifeq ($(DESTDIR),)
	if command -v systemd-sysusers >/dev/null; then systemd-sysusers $(SYSUSERSDIR)/tpb.conf; fi
endif
ifeq ($(LIVE),yes)
	systemctl daemon-reload
	if command -v udevadm >/dev/null; then udevadm control --reload && \
	  udevadm trigger --action=add --subsystem-match=misc --sysname-match=cpu_dma_latency; fi
endif
	@echo "make: installed. Edit $(CONFDIR)/tpb.toml, then: systemctl enable --now tpb"
	@echo "      (on a POP: $(CONFDIR)/tpb-pop.toml, then: systemctl enable --now tpb-pop)"

# Everything `make install` put down, but $(CONFDIR) (the operator's) and the
# user tpb (files may still belong to it).
uninstall:
	@case "$(DESTDIR)" in ""|/*) ;; *) echo "make: DESTDIR must be an absolute path"; exit 2;; esac
ifeq ($(LIVE),yes)
	-systemctl stop tpb.service tpb-pop.service 'tpb@*.service'
	-systemctl disable tpb.service tpb-pop.service tpb@.service
endif
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(notdir $(UNITS)))
	rm -f $(DESTDIR)$(SYSUSERSDIR)/tpb.conf $(DESTDIR)$(UDEVRULESDIR)/70-tpb.rules
	rm -f $(DESTDIR)$(BINDIR)/tpb
	rm -rf $(DESTDIR)$(TPB_HOME) $(DESTDIR)$(SHAREDIR)
ifeq ($(LIVE),yes)
	systemctl daemon-reload
	if command -v udevadm >/dev/null; then udevadm control --reload; fi
endif
	@echo "make: uninstalled; kept $(DESTDIR)$(CONFDIR) and the user tpb"

include fuzz/fuzz.mk
