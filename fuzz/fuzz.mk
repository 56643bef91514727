# fuzz.mk — the libFuzzer harnesses (fuzz/README.md), included by ../Makefile.
# clang-14 with libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer;
# the helper's sources with -DTPB_FUZZ (no sockets: txq.c and pop.c hand
# their output to the harness).  Nothing here touches the cffi module.

FUZZ_CC       ?= clang-14
FUZZ_DIR      := build/fuzz
FUZZ_HARNESS  := from_out encap forward reasm pop gre
FUZZ_SECONDS  ?= 60
FUZZ_SAN      := -fsanitize=address,undefined -fno-sanitize-recover=undefined
FUZZ_CFLAGS   := -g -O1 -fno-omit-frame-pointer -std=gnu11 -Wall -Wextra \
                 -Wno-unused-parameter -DTPB_FUZZ -Icsrc -Ifuzz $(FUZZ_SAN)
FUZZ_CSRC     := ring txq txring bridge bridge_open csum gre encap segment udpgso coalesce decap reasm keepalive pop pop_rx pop_learn pop_ka pop_conf pop_tx pop_gro shed bpf
FUZZ_OBJS     := $(FUZZ_CSRC:%=$(FUZZ_DIR)/obj/%.o) $(FUZZ_DIR)/obj/common.o
FUZZ_BINS     := $(FUZZ_HARNESS:%=$(FUZZ_DIR)/%)

$(FUZZ_DIR)/obj/%.o: csrc/%.c $(wildcard csrc/*.h) fuzz/fuzz.mk
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer-no-link -c $< -o $@

# The harnesses' own code is not instrumented for coverage: its loops
# (building datagrams, checking every output byte) would cost more than
# the pipeline itself, and what steers the fuzzer is the helper's code.
$(FUZZ_DIR)/obj/common.o: fuzz/common.c fuzz/fuzz.h $(wildcard csrc/*.h) fuzz/fuzz.mk
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_DIR)/libtpbfuzz.a: $(FUZZ_OBJS)
	rm -f $@ && ar rcs $@ $^

$(FUZZ_DIR)/obj/h_%.o: fuzz/%.c fuzz/fuzz.h $(wildcard csrc/*.h) fuzz/fuzz.mk
	@mkdir -p $(@D)
	$(FUZZ_CC) $(FUZZ_CFLAGS) -c $< -o $@

$(FUZZ_DIR)/%: $(FUZZ_DIR)/obj/h_%.o $(FUZZ_DIR)/libtpbfuzz.a
	$(FUZZ_CC) $(FUZZ_CFLAGS) -fsanitize=fuzzer $< $(FUZZ_DIR)/libtpbfuzz.a -lpthread -o $@

.PHONY: fuzz fuzz-build fuzz-deps
.SECONDARY: $(FUZZ_HARNESS:%=$(FUZZ_DIR)/obj/h_%.o)

# clang-14 and its libFuzzer runtime (Debian 12), only if missing.
fuzz-deps:
	@command -v $(FUZZ_CC) >/dev/null && [ -n "$$($(FUZZ_CC) -print-file-name=libclang_rt.fuzzer-x86_64.a | grep /)" ] || \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends clang-14 libclang-rt-14-dev; }

fuzz-build: fuzz-deps $(FUZZ_BINS)

# Each harness for FUZZ_SECONDS, one after the other (FUZZ_HARNESS=pop for
# one); new inputs go to build/fuzz/corpus/<harness> (fuzz/corpus/<harness>
# is only read), findings to build/fuzz/artifacts/<harness>/.  A finding
# ends that harness's run, unless FUZZ_KEEP_GOING=1 (libFuzzer's fork mode:
# it goes on and collects them all; fuzz/triage.py sorts them out).
FUZZ_KEEP_GOING ?=
# FUZZ_RUNS=N stops a harness after N executions (or FUZZ_SECONDS, first).
FUZZ_RUNS ?=
FUZZ_OPTS := -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
             $(if $(FUZZ_RUNS),-runs=$(FUZZ_RUNS)) \
             $(if $(FUZZ_KEEP_GOING),-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)

fuzz: fuzz-build
	@failed=""; for h in $(FUZZ_HARNESS); do \
	  rm -rf $(FUZZ_DIR)/artifacts/$$h; mkdir -p $(FUZZ_DIR)/corpus/$$h $(FUZZ_DIR)/artifacts/$$h; \
	  echo "fuzz: $$h for $(FUZZ_SECONDS) s"; \
	  $(FUZZ_DIR)/$$h -max_total_time=$(FUZZ_SECONDS) $(FUZZ_OPTS) \
	    -artifact_prefix=$(FUZZ_DIR)/artifacts/$$h/ \
	    $(FUZZ_DIR)/corpus/$$h fuzz/corpus/$$h 2>$(FUZZ_DIR)/$$h.log || failed="$$failed $$h"; \
	  grep -E "^stat::number_of_executed_units|^stat::average_exec_per_sec|^#[0-9]+: cov" \
	    $(FUZZ_DIR)/$$h.log | tail -2; \
	  [ -z "$$(ls -A $(FUZZ_DIR)/artifacts/$$h)" ] || failed="$$failed $$h"; \
	done; \
	if [ -n "$$failed" ]; then \
	  echo "fuzz: findings in:$$failed (see build/fuzz/<harness>.log, build/fuzz/artifacts/)"; \
	  exit 1; \
	fi
