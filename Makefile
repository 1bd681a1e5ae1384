# DistriProc: the front door.
#
#   make demo    checkpoint + lazy restore (embedded default store, page server) vs the runc shim, 1 GiB (MIB=...)
#   make test    everything: deps, test images, unit tests, real-stack e2e on containerd 2.1 and 1.7
#
# Other targets: deps build install test-images e2e lint clean.
SHELL        := /bin/bash
CARGO        ?= cargo
PREFIX       ?= /usr/local
OPT          ?= /opt/distriproc
CTD_2        ?= $(OPT)/containerd-2.1/usr/bin
CTD_1        ?= $(OPT)/containerd-1.7/usr/bin
RELEASE_BINS := containerd-shim-distriproc-v2 distriproc-pageserver

.PHONY: all deps build install test-images test unit e2e e2e-2 e2e-1 demo bench soak lint clean fuzz check-deploy

all: build

deps:
	bash scripts/deps.sh

build:
	$(CARGO) build --release --workspace

install: build
	install -d $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(addprefix target/release/,$(RELEASE_BINS)) $(DESTDIR)$(PREFIX)/bin/

test-images:
	$(MAKE) -C test-images

# Unit and crate tests plus every real-stack test against containerd 2.1 (one at a time:
# they share runc/CRIU and /run/containerd), then the e2e test targets again against 1.7.
test: deps test-images
	@bash scripts/test.sh all

unit:
	@bash scripts/test.sh unit

e2e: test-images
	@bash scripts/test.sh e2e

e2e-2: test-images
	@bash scripts/test.sh e2e-2

e2e-1: test-images
	@bash scripts/test.sh e2e-1

demo: deps build test-images
	bash scripts/demo.sh

# Restore benchmarks through containerd (eager, CRIU lazy-pages, ours; docs/BENCHMARKS.md).
bench: deps test-images
	bash bench/run.sh

# The memory-budget soak (docs/BENCHMARKS.md): a 1 GiB memhog under a 256 MiB budget with
# write-back, SOAK_SECS (default 600) per shape (4 threads, 4 processes).
soak: deps test-images
	$(CARGO) test --release -p containerd-shim-distriproc-v2 --test e2e_budget -- \
		--ignored --test-threads=1 --nocapture soak_

# Every cargo-fuzz target for FUZZ_SECONDS (default 60) each (docs/FUZZING.md).
fuzz:
	sh fuzz/run.sh

# containerd 1.7/2.1 accept the runtime snippets; Kubernetes manifests validate.
check-deploy:
	bash deploy/check.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(MAKE) -C test-images clean
	$(CARGO) clean
