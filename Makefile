# Husk: the one entry layer. Targets call cargo and the scripts; see README.md.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

CARGO ?= cargo
GUEST_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(GUEST_TARGET)/guest/husk-agent
# The agent is /init of the guest: static, with libseccomp linked in (not the shared library).
AGENT_ENV := RUSTFLAGS="-C target-feature=+crt-static" LIBSECCOMP_LINK_TYPE=static \
	LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu

.PHONY: all deps build agent guest-image testhost lint test unit-test demo clean

all: build guest-image

## deps: install the system packages a fresh Debian 12 machine lacks (needs root or sudo)
deps:
	scripts/install-deps

## build: host binaries (husk, husk-vmm, ...) in target/debug
build:
	$(CARGO) build --workspace --locked

## agent: the static guest agent
agent:
	$(AGENT_ENV) $(CARGO) build --locked -p husk-agent --profile guest --target $(GUEST_TARGET)

## guest-image: build/guest/{vmlinux,initramfs.cpio,manifest.json} (the kernel is cached by input hash)
guest-image: agent
	guest-image/build build/guest

## testhost: the nested test host's kernel and initramfs (cached by input hash)
testhost:
	tests/testhost/build-base >/dev/null

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## test: everything CI runs: lint, unit tests, guest image checks and VM tests (in the test host
## where this machine's KVM cannot run guests)
test: lint build guest-image testhost
	$(CARGO) test --workspace --locked -- --test-threads=2

## demo: what works end to end so far: build everything and ask the VM host whether it can run Husk
demo: build guest-image testhost
	tests/vm-host-run target/debug/husk check

clean:
	$(CARGO) clean
	rm -rf build
