# fabric: `make demo` and `make test` work as root on a fresh Debian machine
# with Go; each installs the Debian packages it needs.
GO      ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/fabricnet/fabric/version.Version=$(VERSION)
BIN     := bin
export CGO_ENABLED=0

.PHONY: all build deps-test deps-demo test test-short demo bench clean

all: build

build:
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/fabricd ./cmd/fabricctl ./cmd/fabriclab

deps-test:
	./scripts/install-deps.sh test

deps-demo:
	./scripts/install-deps.sh demo

# Every package, the lab integration tests and the qemu IPIP lane.
test: deps-test build
	$(GO) vet ./...
	FABRIC_BIN=$(CURDIR)/$(BIN) $(GO) test -count=1 -timeout 25m -p 1 ./...

demo: deps-demo build
	./$(BIN)/fabriclab demo --bin $(CURDIR)/$(BIN)

bench: deps-demo build
	FABRIC_BIN=$(CURDIR)/$(BIN) $(GO) run ./bench

clean:
	rm -rf $(BIN)
