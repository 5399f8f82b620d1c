# Ferry. `make run` serves on 127.0.0.1:7600 with data in ./data; `make test` is what CI runs.
GO ?= go
BIN := bin
PKGS := ./...
RACE_PKGS := ./relay/... ./inbox/... ./keys/... ./device/... ./group/... ./push/... ./presence/... ./client/... ./internal/... ./cluster/... ./route/... ./shardmove/...
FUZZTIME ?= 20s

.PHONY: all build run test test-short test-deps race vet fmt-check lint proto bench fuzz soak clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/ferryd ./cmd/ferry ./cmd/ferry-bench

run: build
	$(BIN)/ferryd --listen 127.0.0.1:7600 --data ./data

# The whole suite: vet, gofmt, unit + black-box tests, race detector on the
# concurrent packages, a short run of every fuzz target's seed corpus (always
# part of `go test`).
test: vet fmt-check build test-deps
	$(GO) test -count=1 $(PKGS)
	$(GO) test -count=1 -race $(RACE_PKGS)

# Cluster tests start their own redis-server processes (internal/redistest),
# the ACME test a local pebble ACME server; without them those tests skip.
# CI installs both when it can (Debian: redis-server, pebble).
test-deps:
	@command -v redis-server >/dev/null || test -x /usr/bin/redis-server || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing redis-server (cluster tests)"; \
	    apt-get install -y redis-server >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; } || \
	      echo "warning: redis-server could not be installed; cluster tests will skip"; \
	  else echo "warning: redis-server missing; cluster tests will skip (apt-get install -y redis-server)"; fi; }
	@command -v pebble >/dev/null || test -x /usr/bin/pebble || { \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing pebble, the ACME test server (ferryd's autocert test)"; \
	    apt-get install -y pebble >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y pebble >/dev/null; } || \
	      echo "warning: pebble could not be installed; the ACME issuance test will skip"; \
	  else echo "warning: pebble missing; the ACME issuance test will skip (apt-get install -y pebble)"; fi; }

test-short:
	$(GO) test -short $(PKGS)

vet:
	$(GO) vet $(PKGS)

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go') | grep -v '\.pb\.go$$' || true); \
	if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

lint: vet fmt-check

# Regenerates committed protobuf code. Needs protoc (Debian: protobuf-compiler);
# protoc-gen-go is pinned in go.mod as a tool.
proto:
	@command -v protoc >/dev/null || { echo "protoc missing: apt-get install -y protobuf-compiler"; exit 1; }
	$(GO) build -o $(BIN)/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	protoc --plugin=protoc-gen-go=$(BIN)/protoc-gen-go --go_out=. --go_opt=module=github.com/ferryhq/ferry \
		-I wire wire/ferry.proto
	protoc --plugin=protoc-gen-go=$(BIN)/protoc-gen-go --go_out=. --go_opt=module=github.com/ferryhq/ferry \
		-I store/storepb store/storepb/records.proto
	protoc --plugin=protoc-gen-go=$(BIN)/protoc-gen-go --go_out=. --go_opt=module=github.com/ferryhq/ferry \
		-I wire -I store/storepb -I route/routepb route/routepb/route.proto

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./inbox/ ./relay/

# Runs every fuzz target for FUZZTIME each.
fuzz:
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz'); do \
	    echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 100x $$pkg || exit 1; \
	  done; \
	done

# Long black-box runs (crash loops, bigger message counts). See README.
soak: build
	FERRY_SOAK=1 $(GO) test -count=1 -run 'BlackBox' -timeout 60m ./cmd/...

clean:
	rm -rf $(BIN)
