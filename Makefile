# Husk: the one entry layer. Targets call cargo and the scripts; see README.md.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CARGO ?= cargo
# A CI run builds once from a clean checkout: incremental caches would only take disk.
ifdef CI
export CARGO_INCREMENTAL := 0
endif
GUEST_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(GUEST_TARGET)/guest/husk-agent
# The agent is /init of the guest: static, with libseccomp linked in (not the shared library).
AGENT_ENV := RUSTFLAGS="-C target-feature=+crt-static" LIBSECCOMP_LINK_TYPE=static \
	LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu

.PHONY: all deps build build-tests agent guest-image testhost containerd lint fuzz test flaky demo demo-run install bench soak clean

all: build guest-image

## deps: install the system packages a fresh Debian 12 machine lacks (needs root or sudo)
deps:
	scripts/install-deps

## build: host binaries (husk, husk-vmm, ...) in target/debug
build:
	$(CARGO) build --workspace --locked

## build-tests: the host binaries and every test target in one build (built apart, `cargo test`
## would compile the crates whose features its dev-dependencies unify a second time)
build-tests:
	$(CARGO) build --workspace --all-targets --locked

## agent: the static guest agent
agent:
	$(AGENT_ENV) $(CARGO) build --locked -p husk-agent --profile guest --target $(GUEST_TARGET)

## guest-image: build/guest/{vmlinux,initramfs.cpio,manifest.json} (the kernel is cached by input hash)
guest-image: agent
	guest-image/build build/guest

## testhost: the nested test host's kernel and initramfs (cached by input hash)
testhost:
	tests/testhost/build-base >/dev/null

## containerd: containerd 2.x from Debian's packages into build/containerd (the shim's tests and
## the runc baseline; fetched once per version, cached)
containerd:
	scripts/fetch-containerd build/containerd

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	@# fuzz/ has a lock file of its own: a dependency change in the workspace must reach it too.
	$(CARGO) metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null

## fuzz: build the fuzz targets and run each from its committed corpus (FUZZ_SECONDS, default 300)
FUZZ_SECONDS ?= 300
fuzz:
	fuzz/run --time $(FUZZ_SECONDS)

## test: everything CI runs: lint, unit tests, guest image checks and VM tests (in the test host
## where this machine's KVM cannot run guests); the fuzz targets build beside the tests, on the
## CPU time the emulated test host leaves idle (scripts/test-suite)
test: lint build-tests guest-image testhost containerd
	scripts/test-suite $(CARGO)

## flaky: the tests of every VM test binary (tests/tests/*.rs) K times (default 3) on one build,
## each binary as make test runs it (ONE_AT_A_TIME=1: each test alone); prints per test its
## passes, failures and times, and per test binary its time per round (build/flaky/report.md;
## failures' output beside it). FILTER (a regular expression) picks binaries.
K ?= 3
FILTER ?=
ONE_AT_A_TIME ?=
flaky: build-tests guest-image testhost containerd
	fuzz/run --build-only
	scripts/flaky $(if $(ONE_AT_A_TIME),--one-at-a-time) $(K) '$(FILTER)'

GUEST := --kernel build/guest/vmlinux --initrd build/guest/initramfs.cpio

## demo: a container in a microVM through containerd: a private containerd 2.x (build/containerd)
## imports the offline busybox image and `ctr run --runtime io.containerd.husk.v2` runs it; the
## shim boots the pod's VM in its own process. On the VM host: directly where this machine's KVM
## can run guests, otherwise inside the nested test host.
demo: build guest-image testhost containerd
	scripts/busybox-oci-image build/demo-busybox.tar >/dev/null
	tests/vm-host-run -- tests/containerd-env build/containerd -- scripts/demo-containerd build/demo-busybox.tar

## demo-run: the same without containerd: `husk run` on a busybox root file system
demo-run: build guest-image testhost
	scripts/busybox-rootfs build/demo-rootfs
	tests/vm-host-run target/debug/husk run build/demo-rootfs -- \
		sh -c 'echo "hello from a container in a Husk microVM: kernel $$(uname -r), pid $$$$, $$(nproc) vCPU"'

## install: release binaries to $(PREFIX)/bin, the guest image to /usr/share/husk/guest, the
## default configuration to /etc/husk (an existing one is kept) and the containerd/Kubernetes
## snippets to $(PREFIX)/share/husk (DESTDIR for staging)
PREFIX ?= /usr/local
install: guest-image
	$(CARGO) build --release --locked -p husk-shim
	install -D -m 0755 target/release/husk $(DESTDIR)$(PREFIX)/bin/husk
	install -D -m 0755 target/release/containerd-shim-husk-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-husk-v2
	install -D -m 0644 -t $(DESTDIR)/usr/share/husk/guest build/guest/vmlinux build/guest/initramfs.cpio build/guest/manifest.json
	[ -e $(DESTDIR)/etc/husk/configuration.toml ] || \
		install -D -m 0644 configs/configuration.toml $(DESTDIR)/etc/husk/configuration.toml
	install -D -m 0644 -t $(DESTDIR)$(PREFIX)/share/husk configs/containerd-husk.toml configs/runtimeclass.yaml

## bench: boot benchmark, husk-vmm side by side with QEMU microvm (same kernel, same KVM); vsock
## benchmark, husk-vmm's hybrid vsock side by side with a host-local unix socket (same run);
## virtio-fs benchmark, file workloads over the share side by side with the host directory;
## container stdio and exec benchmark, a pod in the VM side by side with a host-mode agent;
## containerd benchmark, `ctr run` and an idle pod's memory with Husk side by side with runc;
## CRI benchmark, pod_start_ms (RunPodSandbox to a started container) with Husk beside runc;
## pod network benchmark, net_mb_per_s and net_rtt_us between two Husk pods beside two runc pods;
## density, N pods started at once. Logs in build/bench/logs, the report in build/bench/report.{json,md}
## with plots (docs/performance.md)
bench: build guest-image testhost containerd
	$(CARGO) build --release --locked -p husk-vmm -p husk-shim -p husk-tests --bin husk-vmm --bin husk-bench-boot \
		--bin husk-bench-vsock --bin husk-bench-fs --bin husk-bench-stdio --bin husk-bench-ctr \
		--bin husk-cri-pod --bin husk-cri-net --bin husk-cri-density --bin husk-bench-report \
		--bin containerd-shim-husk-v2
	$(CARGO) build --release --locked -p husk-agent
	scripts/bench

## soak: SOAK_CONCURRENT (default 20) CRI pods at once, started and removed until SOAK_TOTAL
## (default 200) have run; prints each count's growth after the warm-up round (all must be 0)
SOAK_CONCURRENT ?= 20
SOAK_TOTAL ?= 200
soak: build guest-image testhost containerd
	scripts/soak $(SOAK_CONCURRENT) $(SOAK_TOTAL)

clean:
	$(CARGO) clean
	rm -rf build
