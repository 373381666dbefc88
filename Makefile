# fabric: `make demo` and `make test` work as root on a fresh Debian machine
# with Go; each installs the Debian packages it needs.
GO      ?= go
# Every build and test uses Go 1.27.3, which the go command fetches from the
# module proxy once (76 MB): the machine's Go 1.26.8 has standard-library
# vulnerabilities that `make vulncheck` reports (net/http, crypto/tls,
# crypto/x509). GOTOOLCHAIN=local would build with the machine's Go.
GOTOOLCHAIN ?= go1.27.3
export GOTOOLCHAIN
# govulncheck and the Go vulnerability database, both from the module proxy
# (vuln.go.dev is not reachable from every build machine). Update both with
# `make vulncheck-versions`.
GOVULNCHECK_VERSION := v1.10.0
VULNDB_VERSION      := v0.0.0-20261105234957-e22db6528018
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/fabricnet/fabric/version.Version=$(VERSION)
BIN     := bin
export CGO_ENABLED=0

.PHONY: all build deps-test deps-demo deps-bench test test-quick demo bench deb install clean vulncheck vulncheck-versions

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/fabricd ./cmd/fabricctl ./cmd/fabriclab

deps-test:
	./scripts/install-deps.sh test

deps-demo:
	./scripts/install-deps.sh demo

# Every package, the lab integration tests and the qemu guest lane. The
# tests spend most of their time waiting (BGP timers, sessions, a VM), so
# packages and the e2e tests run several at a time; each lab has its own
# namespaces, etcd and processes.
test: deps-test build vulncheck
	$(GO) vet ./...
	FABRIC_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 25m -p 4 -parallel 4 ./...

# The inner loop: no root, no lab, no VM (those tests skip in short mode).
test-quick:
	$(GO) vet ./...
	$(GO) test -short -count=1 ./...

demo: deps-demo build
	./$(BIN)/fabriclab demo --bin $(CURDIR)/$(BIN)

# Fails on every known vulnerability the code reaches, but those accepted
# with a reason in tools/vulncheck.
vulncheck:
	$(GO) run ./tools/vulncheck -govulncheck $(GOVULNCHECK_VERSION) -vulndb $(VULNDB_VERSION)

# The newest govulncheck and database the module proxy serves.
vulncheck-versions:
	@$(GO) list -m -f '{{.Path}} {{.Version}}' golang.org/x/vuln@latest golang.org/x/vulndb@latest

deps-bench:
	./scripts/install-deps.sh bench

bench: deps-bench build
	FABRIC_BIN=$(CURDIR)/$(BIN) $(GO) run ./bench

# A .deb with fabricd, fabricctl, the systemd unit, the docker.service
# drop-in, /etc/fabric/fabricd.yaml and the docs (dpkg-deb).
deb:
	./scripts/build-deb.sh $(BIN)

# Install on this host, as the .deb would (DESTDIR for staging).
install: build
	install -D -m 0755 $(BIN)/fabricd $(DESTDIR)/usr/bin/fabricd
	install -D -m 0755 $(BIN)/fabricctl $(DESTDIR)/usr/bin/fabricctl
	install -D -m 0644 packaging/fabricd.service $(DESTDIR)/lib/systemd/system/fabricd.service
	install -D -m 0644 packaging/docker-fabric.conf $(DESTDIR)/lib/systemd/system/docker.service.d/fabric.conf
	test -e $(DESTDIR)/etc/fabric/fabricd.yaml || install -D -m 0600 packaging/fabricd.yaml $(DESTDIR)/etc/fabric/fabricd.yaml

clean:
	rm -rf $(BIN)
