# qrexec-connect: build, test, demo, install and package.
#
#   make build                      release binaries and man pages (as yourself)
#   make test                       every test (as root: installs what the tests need first)
#   make demo                       a live forwarding demo with the qrexec-client-vm test double
#   sudo make install-client        client qube: daemon, generator, units (template qube)
#   sudo make install-client PREFIX=/usr/local   the same, kept by an app qube across reboots
#   sudo make install-connectnfs    service qube: the qubes.ConnectNFS RPC
#   sudo make uninstall             remove what install-client and install-connectnfs put
#   make dist                       source tarball with every crate vendored (offline builds)
#   make deb / make rpm             packages, built from that tarball (docs/packaging.md)
#   make bench                      the benchmark (bench/README.md); BENCH_QUICK=1 for a smoke run
#   make bench-scaling              only its scaling run (1, 50, 400 bindings, real user manager)
#   make salt-venv                  Salt for tests/salt.rs (target/salt-venv; make test makes it)
#
# DESTDIR is honoured everywhere. With PREFIX=/usr the systemd directories
# come from pkg-config; with another prefix they move under it
# ($(PREFIX)/lib/systemd/...), which systemd also searches.

VERSION := $(shell cat version)
PREFIX ?= /usr
DESTDIR ?=
CARGO ?= cargo
CARGO_FLAGS ?=
PROFILE ?= release
BINDIR ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
MANDIR ?= $(PREFIX)/share/man
# Shell completions. zsh: Debian reads vendor-completions, Fedora (and
# /usr/local everywhere) site-functions; the RPM spec sets ZSHCOMPDIR.
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ifeq ($(PREFIX),/usr)
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/vendor-completions
else
ZSHCOMPDIR ?= $(PREFIX)/share/zsh/site-functions
endif
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d

systemd_var = $(shell pkg-config --define-variable=prefix=$(PREFIX) --variable=$(1) systemd 2>/dev/null)
USERUNITDIR ?= $(or $(call systemd_var,systemduserunitdir),$(PREFIX)/lib/systemd/user)
USERGENERATORDIR ?= $(or $(call systemd_var,systemdusergeneratordir),$(PREFIX)/lib/systemd/user-generators)

# Qubes looks for RPCs in /etc/qubes-rpc and /usr/local/etc/qubes-rpc (the
# latter survives in app qubes); rpc-config likewise.
ifeq ($(PREFIX),/usr)
QUBES_ETC ?= /etc
else
QUBES_ETC ?= $(PREFIX)/etc
endif
QUBESRPCDIR ?= $(QUBES_ETC)/qubes-rpc
RPCCONFIGDIR ?= $(QUBES_ETC)/qubes/rpc-config

TARGET_DIR ?= target
OUT := $(TARGET_DIR)/$(PROFILE)
ifeq ($(PROFILE),release)
CARGO_PROFILE_FLAG := --release
else
CARGO_PROFILE_FLAG := --profile $(PROFILE)
endif
ifeq ($(PROFILE),debug)
CARGO_PROFILE_FLAG :=
endif

CLIENT_BINARIES := $(OUT)/qrexec-connect $(OUT)/qrexec-connect-generator
SCDOC ?= scdoc
CLIENT_MAN := man/qrexec-connect.8 man/qrexec-connect-generator.8 man/qrexec-connect.conf.5
NFS_MAN := man/qubes.ConnectNFS.8
NFS_BINARY := $(OUT)/qrexec-connect-nfs
# The sources each binary is built from (its package, and the shared crate
# it links): an install refuses a binary that is missing or older than
# these, rather than building it as root.
BINDING_SOURCES := $(wildcard crates/binding/src/*.rs) crates/binding/Cargo.toml
$(OUT)/qrexec-connect: $(BINDING_SOURCES) $(wildcard src/bin/qrexec-connect/*.rs src/bin/qrexec-connect/*/*.rs) Cargo.toml \
	generator/lib.rs generator/config.rs generator/unit.rs
$(OUT)/qrexec-connect-generator: $(BINDING_SOURCES) $(wildcard generator/*.rs) generator/Cargo.toml
$(OUT)/qrexec-connect-nfs: $(wildcard connect-nfs/*.rs) connect-nfs/Cargo.toml

# Every user unit, generated from units/*.in where it names the bindir.
UNIT_TEMPLATES := $(wildcard units/*.service.in units/*.path.in)
UNIT_FILES := $(filter-out %.in,$(wildcard units/*.service units/*.path))

DIST_NAME := qrexec-connect-$(VERSION)
DIST_DIR := $(TARGET_DIR)/dist
DIST_TARBALL := $(DIST_DIR)/$(DIST_NAME).tar.gz

# A recipe that fails (e.g. scdoc missing) must not leave a half-written or
# empty file behind for the next make to install.
.DELETE_ON_ERROR:

.PHONY: all build test test-packages salt-venv demo bench bench-scaling bench-reload man install install-client \
	install-client-files \
	install-connectnfs uninstall dist deb rpm clean

all: build

# Only the programs that get installed: not the test double (its package,
# tests/, is not among the workspace's default members).
build: man
	$(CARGO) build $(CARGO_PROFILE_FLAG) --locked $(CARGO_FLAGS) \
		-p qrexec-connect -p qrexec-connect-generator -p qrexec-connect-nfs

# Man pages are written in scdoc (Debian/Fedora package scdoc); the footer
# carries the version.
man: $(CLIENT_MAN) $(NFS_MAN)

man/%: man/%.scd version
	sed 's/@VERSION@/$(VERSION)/g' $< | $(SCDOC) > $@

$(CLIENT_BINARIES) $(NFS_BINARY):
	@echo "$@ is missing or older than its sources: run 'make build' first (as yourself, not as root)" >&2
	@exit 1

# Every test of every package, on a Debian 12 machine set up first (below).
# The integration tests run the programs from target/debug, so those are
# built first (cargo test builds only the test double's package's binary); a
# missing or stale one fails its test.
test: test-packages
	$(MAKE) --no-print-directory salt-venv
	$(CARGO) build --workspace --locked
	QREXEC_CONNECT_SALT_CALL=$(abspath $(SALT_CALL)) $(CARGO) test --workspace --locked

# What the tests need besides Rust, git and make: the Debian packages of
# TEST_PACKAGES, one list that .ci/run uses too (through this target). As
# root with apt-get, the missing ones are installed; otherwise make stops at
# once, before any build, with the command to run.
TEST_PACKAGES := tests/debian-packages.txt
test-packages:
	@packages=$$(sed 's/#.*//' $(TEST_PACKAGES)); \
	if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-query >/dev/null 2>&1; then \
		echo "make test: this machine has no apt-get. The tests need Debian 12 (they install" >&2; \
		echo "the packages of $(TEST_PACKAGES) with apt-get, and build and install .deb" >&2; \
		echo "packages): run  sudo make test  on Debian 12 (e.g. in a debian-12 qube)." >&2; \
		exit 1; \
	fi; \
	installed=$$(dpkg-query -W -f='$${db:Status-Abbrev} $${Package}\n' $$packages 2>/dev/null \
		| awk '$$1 == "ii" { print $$2 }'); \
	missing=$$(for package in $$packages; do \
		echo "$$installed" | grep -qxF "$$package" || echo "$$package"; done | xargs); \
	if [ "$$(id -u)" != 0 ]; then \
		echo "make test needs root (it runs a real systemd user manager in a private mount" >&2; \
		echo "namespace$${missing:+, and installs $$missing}): run  sudo make test" >&2; \
		exit 1; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "make test: installing what the tests need ($(TEST_PACKAGES)): $$missing"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# tests/salt.rs applies the formula in salt/ with a real salt-call: Salt from
# PyPI with every dependency pinned (--no-deps: nothing unpinned gets in), in
# a virtualenv made again whenever the pins change.
SALT_VENV := $(TARGET_DIR)/salt-venv
SALT_CALL := $(SALT_VENV)/bin/salt-call
salt-venv: $(SALT_CALL)

$(SALT_CALL): tests/salt/requirements.txt
	rm -rf $(SALT_VENV)
	python3 -m venv $(SALT_VENV)
	$(SALT_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps \
		-r tests/salt/requirements.txt
	$(SALT_VENV)/bin/pip check --disable-pip-version-check
	touch $@

demo:
	$(CARGO) build --locked -p qrexec-connect -p qrexec-connect-generator -p qrexec-connect-tests
	./demo/run.sh

bench:
	./bench/run.sh

bench-scaling:
	./bench/scaling.sh

# Time from daemon-reload to a new binding answering (real user manager; root).
bench-reload:
	$(CARGO) build --workspace --locked
	$(CARGO) test --locked -p qrexec-connect-tests --test reload_latency -- --ignored --nocapture

install: install-client

# The files of the client side, as the packages hold them (they enable the
# reload watcher their own way: deb-systemd-helper, rpm presets).
install-client-files: $(CLIENT_BINARIES) $(CLIENT_MAN)
	install -d $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0644 man/qrexec-connect.8 man/qrexec-connect-generator.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 man/qrexec-connect.conf.5 $(DESTDIR)$(MANDIR)/man5/
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(USERGENERATORDIR) \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d $(DESTDIR)$(LIBEXECDIR)/qrexec-connect
	install -m 0755 $(OUT)/qrexec-connect $(DESTDIR)$(BINDIR)/qrexec-connect
	install -m 0755 $(OUT)/qrexec-connect-generator $(DESTDIR)$(USERGENERATORDIR)/qrexec-connect-generator
	ln -sfr $(DESTDIR)$(USERGENERATORDIR)/qrexec-connect-generator $(DESTDIR)$(BINDIR)/qrexec-connect-generator
	install -m 0755 units/user-sessions $(DESTDIR)$(LIBEXECDIR)/qrexec-connect/user-sessions
	for template in $(UNIT_TEMPLATES); do \
		unit=$${template##*/}; unit=$${unit%.in}; \
		sed 's|@bindir@|$(BINDIR)|g' $$template > $(DESTDIR)$(USERUNITDIR)/$$unit || exit 1; \
		chmod 0644 $(DESTDIR)$(USERUNITDIR)/$$unit; \
	done
	install -m 0644 $(UNIT_FILES) $(DESTDIR)$(USERUNITDIR)/
	install -m 0644 units/qrexec-connect-.socket.d/10-qrexec-connect.conf \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d/10-qrexec-connect.conf
	install -d $(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -m 0644 completions/qrexec-connect.bash $(DESTDIR)$(BASHCOMPDIR)/qrexec-connect
	ln -sf qrexec-connect $(DESTDIR)$(BASHCOMPDIR)/qrexec-connect-generator
	install -m 0644 completions/_qrexec-connect $(DESTDIR)$(ZSHCOMPDIR)/_qrexec-connect
	install -m 0644 completions/qrexec-connect.fish completions/qrexec-connect-generator.fish \
		$(DESTDIR)$(FISHCOMPDIR)/

# By hand: the reload watcher is enabled with a link next to the units (under
# /usr/local in an app qube, where /etc/systemd/user would not survive a
# reboot), and started in every user manager that runs now, so that the
# user's next `systemctl --user daemon-reload` brings the bindings up.
install-client: install-client-files
	install -d $(DESTDIR)$(USERUNITDIR)/paths.target.wants
	ln -sf ../qrexec-connect-reconcile.path \
		$(DESTDIR)$(USERUNITDIR)/paths.target.wants/qrexec-connect-reconcile.path
ifeq ($(DESTDIR),)
	$(LIBEXECDIR)/qrexec-connect/user-sessions start
endif

# The program lives with our other helpers; /etc/qubes-rpc holds a link to
# it, as Qubes' own services do (qrexec runs the link's target).
install-connectnfs: $(NFS_BINARY) $(NFS_MAN)
	install -d $(DESTDIR)$(QUBESRPCDIR) $(DESTDIR)$(RPCCONFIGDIR) $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(LIBEXECDIR)/qrexec-connect
	install -m 0644 $(NFS_MAN) $(DESTDIR)$(MANDIR)/man8/
	install -m 0755 $(NFS_BINARY) $(DESTDIR)$(LIBEXECDIR)/qrexec-connect/qubes.ConnectNFS
	ln -sf $(LIBEXECDIR)/qrexec-connect/qubes.ConnectNFS $(DESTDIR)$(QUBESRPCDIR)/qubes.ConnectNFS
	install -m 0644 qubes-rpc/rpc-config/qubes.ConnectNFS $(DESTDIR)$(RPCCONFIGDIR)/qubes.ConnectNFS

uninstall:
ifeq ($(DESTDIR),)
	-test ! -x $(LIBEXECDIR)/qrexec-connect/user-sessions || $(LIBEXECDIR)/qrexec-connect/user-sessions stop
endif
	rm -f $(DESTDIR)$(BINDIR)/qrexec-connect $(DESTDIR)$(BINDIR)/qrexec-connect-generator \
		$(DESTDIR)$(USERGENERATORDIR)/qrexec-connect-generator \
		$(DESTDIR)$(LIBEXECDIR)/qrexec-connect/user-sessions \
		$(patsubst units/%.in,$(DESTDIR)$(USERUNITDIR)/%,$(UNIT_TEMPLATES)) \
		$(patsubst units/%,$(DESTDIR)$(USERUNITDIR)/%,$(UNIT_FILES)) \
		$(DESTDIR)$(USERUNITDIR)/paths.target.wants/qrexec-connect-reconcile.path \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d/10-qrexec-connect.conf \
		$(DESTDIR)$(QUBESRPCDIR)/qubes.ConnectNFS $(DESTDIR)$(RPCCONFIGDIR)/qubes.ConnectNFS \
		$(DESTDIR)$(LIBEXECDIR)/qrexec-connect/qubes.ConnectNFS \
		$(DESTDIR)$(MANDIR)/man8/qrexec-connect.8 $(DESTDIR)$(MANDIR)/man8/qrexec-connect-generator.8 \
		$(DESTDIR)$(MANDIR)/man5/qrexec-connect.conf.5 $(DESTDIR)$(MANDIR)/man8/qubes.ConnectNFS.8 \
		$(DESTDIR)$(BASHCOMPDIR)/qrexec-connect $(DESTDIR)$(BASHCOMPDIR)/qrexec-connect-generator \
		$(DESTDIR)$(ZSHCOMPDIR)/_qrexec-connect $(DESTDIR)$(FISHCOMPDIR)/qrexec-connect.fish \
		$(DESTDIR)$(FISHCOMPDIR)/qrexec-connect-generator.fish
	-rmdir $(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d $(DESTDIR)$(LIBEXECDIR)/qrexec-connect

# The source tarball: the tracked files as they are in the work tree, the
# rendered RPM spec, and every crate in vendor/ with a .cargo/config.toml
# that points cargo there, so that a package builds without network.
dist:
	rm -rf $(DIST_DIR)/$(DIST_NAME) $(DIST_TARBALL)
	mkdir -p $(DIST_DIR)/$(DIST_NAME)/.cargo
	git ls-files -z | tar --null -T - -cf - | tar -xf - -C $(DIST_DIR)/$(DIST_NAME)
	sed 's/@VERSION@/$(VERSION)/g' rpm_spec/qrexec-connect.spec.in > $(DIST_DIR)/$(DIST_NAME)/qrexec-connect.spec
	cd $(DIST_DIR)/$(DIST_NAME) && $(CARGO) vendor --locked --versioned-dirs vendor 2>/dev/null > .cargo/config.toml
	grep -q vendored-sources $(DIST_DIR)/$(DIST_NAME)/.cargo/config.toml
	tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@$$(git log -1 --format=%ct) \
		-C $(DIST_DIR) -czf $(DIST_TARBALL) $(DIST_NAME)
	rm -rf $(DIST_DIR)/$(DIST_NAME)
	@echo $(DIST_TARBALL)

# Debian packages from the tarball, with the toolchain the build
# dependencies name (on Debian 12: cargo-web, rustc-web in /usr/bin).
deb: dist
	rm -rf $(DIST_DIR)/deb && mkdir -p $(DIST_DIR)/deb
	tar -xzf $(DIST_TARBALL) -C $(DIST_DIR)/deb
	cd $(DIST_DIR)/deb/$(DIST_NAME) && env PATH=/usr/sbin:/usr/bin:/sbin:/bin \
		dpkg-buildpackage -us -uc -b
	@ls $(DIST_DIR)/deb/*.deb

rpm: dist
	rm -rf $(DIST_DIR)/rpm && mkdir -p $(DIST_DIR)/rpm
	env PATH=/usr/sbin:/usr/bin:/sbin:/bin rpmbuild -tb $(DIST_TARBALL) \
		--define "_topdir $(abspath $(DIST_DIR)/rpm)" --nodeps
	@ls $(DIST_DIR)/rpm/RPMS/*/*.rpm

clean:
	$(CARGO) clean
	rm -f $(CLIENT_MAN) $(NFS_MAN)
