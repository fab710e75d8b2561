# qrexec-connect: build, test, demo and install.
#
#   make build                      release binaries (cargo)
#   make test                       every test (needs root: real systemd in a mount namespace)
#   make demo                       a live forwarding demo with the qrexec-client-vm test double
#   sudo make install-client        client qube: daemon, generator, units (template qube)
#   sudo make install-client PREFIX=/usr/local   the same, kept by an app qube across reboots
#   sudo make install-connectnfs    service qube: the qubes.ConnectNFS RPC
#   make bench                      the benchmark (bench/README.md)
#
# DESTDIR is honoured everywhere. With PREFIX=/usr the systemd directories
# come from pkg-config; with another prefix they move under it
# ($(PREFIX)/lib/systemd/...), which systemd also searches.

PREFIX ?= /usr
DESTDIR ?=
CARGO ?= cargo
PROFILE ?= release
BINDIR ?= $(PREFIX)/bin
MANDIR ?= $(PREFIX)/share/man

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

# A recipe that fails (e.g. scdoc missing) must not leave a half-written or
# empty man page behind for the next make to install.
.DELETE_ON_ERROR:

.PHONY: all build test demo bench bench-reload man install install-client install-connectnfs uninstall clean

all: build

build: man
	$(CARGO) build $(CARGO_PROFILE_FLAG) --locked

# Man pages are written in scdoc (Debian/Fedora package scdoc).
man: $(CLIENT_MAN) $(NFS_MAN)

man/%: man/%.scd
	$(SCDOC) < $< > $@

$(CLIENT_BINARIES) $(NFS_BINARY):
	$(CARGO) build $(CARGO_PROFILE_FLAG) --locked

test:
	$(CARGO) test --locked

demo:
	$(CARGO) build --locked --bin qrexec-connect --bin qrexec-client-vm-double
	./demo/run.sh

bench:
	./bench/run.sh

# Time from daemon-reload to a new binding answering (real user manager; root).
bench-reload:
	$(CARGO) test --locked --test reload_latency -- --ignored --nocapture

install: install-client

install-client: $(CLIENT_BINARIES) $(CLIENT_MAN)
	install -d $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0644 man/qrexec-connect.8 man/qrexec-connect-generator.8 $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 man/qrexec-connect.conf.5 $(DESTDIR)$(MANDIR)/man5/
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(USERGENERATORDIR) \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d \
		$(DESTDIR)$(USERUNITDIR)/paths.target.wants
	install -m 0755 $(OUT)/qrexec-connect $(DESTDIR)$(BINDIR)/qrexec-connect
	install -m 0755 $(OUT)/qrexec-connect-generator $(DESTDIR)$(USERGENERATORDIR)/qrexec-connect-generator
	ln -sf $(USERGENERATORDIR)/qrexec-connect-generator $(DESTDIR)$(BINDIR)/qrexec-connect-generator
	sed 's|@bindir@|$(BINDIR)|g' units/qrexec-connect.service.in \
		> $(DESTDIR)$(USERUNITDIR)/qrexec-connect.service
	sed 's|@bindir@|$(BINDIR)|g' units/qrexec-connect-reconcile.service.in \
		> $(DESTDIR)$(USERUNITDIR)/qrexec-connect-reconcile.service
	sed 's|@bindir@|$(BINDIR)|g' units/qrexec-connect-recover.service.in \
		> $(DESTDIR)$(USERUNITDIR)/qrexec-connect-recover.service
	chmod 0644 $(DESTDIR)$(USERUNITDIR)/qrexec-connect.service \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-reconcile.service \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-recover.service
	install -m 0644 units/qrexec-connect-handover.service units/qrexec-connect-reconcile.path \
		$(DESTDIR)$(USERUNITDIR)/
	install -m 0644 units/qrexec-connect-.socket.d/10-qrexec-connect.conf \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d/10-qrexec-connect.conf
	ln -sf ../qrexec-connect-reconcile.path \
		$(DESTDIR)$(USERUNITDIR)/paths.target.wants/qrexec-connect-reconcile.path

install-connectnfs: $(NFS_BINARY) $(NFS_MAN)
	install -d $(DESTDIR)$(QUBESRPCDIR) $(DESTDIR)$(RPCCONFIGDIR) $(DESTDIR)$(MANDIR)/man8
	install -m 0644 $(NFS_MAN) $(DESTDIR)$(MANDIR)/man8/
	install -m 0755 $(NFS_BINARY) $(DESTDIR)$(QUBESRPCDIR)/qubes.ConnectNFS
	install -m 0644 qubes-rpc/rpc-config/qubes.ConnectNFS $(DESTDIR)$(RPCCONFIGDIR)/qubes.ConnectNFS

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qrexec-connect $(DESTDIR)$(BINDIR)/qrexec-connect-generator \
		$(DESTDIR)$(USERGENERATORDIR)/qrexec-connect-generator \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect.service \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-handover.service \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-reconcile.service \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-recover.service \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-reconcile.path \
		$(DESTDIR)$(USERUNITDIR)/paths.target.wants/qrexec-connect-reconcile.path \
		$(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d/10-qrexec-connect.conf \
		$(DESTDIR)$(QUBESRPCDIR)/qubes.ConnectNFS $(DESTDIR)$(RPCCONFIGDIR)/qubes.ConnectNFS \
		$(DESTDIR)$(MANDIR)/man8/qrexec-connect.8 $(DESTDIR)$(MANDIR)/man8/qrexec-connect-generator.8 \
		$(DESTDIR)$(MANDIR)/man5/qrexec-connect.conf.5 $(DESTDIR)$(MANDIR)/man8/qubes.ConnectNFS.8
	-rmdir $(DESTDIR)$(USERUNITDIR)/qrexec-connect-.socket.d

clean:
	$(CARGO) clean
	rm -f $(CLIENT_MAN) $(NFS_MAN)
