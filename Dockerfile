# openai-api-route container image.
#
#   docker build -t openai-api-route .
#   docker run -d --name oar -p 8888:8888 --stop-timeout 40 --ulimit nice=20 \
#     -v "$PWD/config:/config:ro" -v oar-data:/data \
#     -e OPENAI_API_KEY -e GATEWAY_TOKEN openai-api-route
#
# --ulimit nice=20 (RLIMIT_NICE) lets the non-root gateway move its record writer out of SCHED_IDLE
# when the backlog grows, so the writer may step aside for requests; `--cap-add SYS_NICE` cannot do
# that for a non-root USER (Docker makes no capability ambient), and the binary deliberately carries
# no file capabilities (with them it would not start where SYS_NICE is not granted).
# See docs/operations.md, sections "Docker" and "Record writer priority".

# ---------------------------------------------------------------------------------------------
# Build stage. rust:*-slim already carries gcc and libc6-dev, which the bundled SQLite (rusqlite
# "bundled") and ring need; TLS is rustls with compiled-in webpki roots, so no OpenSSL headers.
FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# 1) Dependencies only, in their own layer: it is rebuilt only when Cargo.toml, Cargo.lock, vendor/
#    or the stand-in script change. Cargo refuses a manifest whose declared targets have no source,
#    even for `cargo build`, so deploy/cargo-stand-ins.sh writes a stand-in for every target the
#    manifest and `cargo metadata` name (library, binary, tests, benches, a build script if one is
#    ever declared): no hand-kept list to forget a target in.
#    Afterwards the stand-in crate's own artifacts and fingerprints are dropped (COPY keeps the
#    build context's mtimes, which can be older than the stand-ins, so cargo could otherwise take
#    the stand-in build for fresh), and so are the stand-ins of what step 2 compiles: a source that
#    step 2 forgot to copy then fails the build instead of shipping a stand-in. Those of tests and
#    benches stay (the image never builds them; cargo only checks they exist).
#    .ci/docker-rehearsal.sh runs this stage's COPY and RUN lines in CI, without a Docker daemon:
#    keep the RUN lines inside WORKDIR (relative paths) so that the rehearsal builds what Docker
#    builds; that is also why the runtime stage copies the binary from target/release directly.
COPY Cargo.toml Cargo.lock ./
# awc with this project's patch (see vendor/awc/PATCHED.md), referenced by [patch.crates-io].
COPY vendor ./vendor
COPY deploy/cargo-stand-ins.sh ./deploy/
RUN sh deploy/cargo-stand-ins.sh write \
 && cargo build --release --locked \
 && cargo clean --release --package openai-api-route \
 && sh deploy/cargo-stand-ins.sh drop

# 2) The real sources. static/ must be present before the build: the stylesheet is compiled in.
#    build.rs only tells the integration tests which outside services exist (it sets no cfg the
#    binary reads), but cargo compiles and runs it for every build, so it is the checkout's own here.
COPY static ./static
COPY build.rs ./
COPY src ./src
RUN cargo build --release --locked

# ---------------------------------------------------------------------------------------------
# Runtime stage: same Debian release as the builder, so the glibc the binary links against matches.
# No ca-certificates needed (webpki roots are compiled in) and no curl/wget: see HEALTHCHECK.
FROM debian:bookworm-slim

# Fixed non-root uid/gid, so a host directory mounted at /data can be chowned to it (10001:10001).
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /config /data \
 && chown gateway:gateway /data

COPY --from=builder /src/target/release/openai-api-route /usr/local/bin/openai-api-route
# A default config so the image runs with just `-e OPENAI_API_KEY -e GATEWAY_TOKEN`; mount your own
# directory at /config to replace it (mount the directory, not the file, so SIGHUP sees edits).
COPY upstreams.example.yaml /config/upstreams.yaml

USER gateway:gateway
WORKDIR /data

# /config: upstreams.yaml (read-only is fine). /data: db.sqlite plus its -wal/-shm files (SQLite WAL
# mode), so it must be a writable directory, not a single-file mount.
VOLUME ["/config", "/data"]
EXPOSE 8888

# Health check without extra packages: bash (always present in Debian, it is Essential) opens a TCP
# connection through its /dev/tcp redirection, sends a bare HTTP/1.0 request and expects a 200 status
# line. This keeps curl/wget and their dependencies out of the image. It assumes the default port:
# if you change -addr, override the HEALTHCHECK too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8888 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r line <&3 && [[ $line == *' 200 '* ]]"]

# SIGTERM starts the graceful shutdown (in-flight requests get up to 30 s, then queued records are
# written). docker stop waits only 10 s by default: run with --stop-timeout 40 (compose:
# stop_grace_period: 40s). The exec-form ENTRYPOINT makes the gateway PID 1, so it gets the signal.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/openai-api-route"]
CMD ["-addr", ":8888", "-config", "/config/upstreams.yaml", "-database", "/data/db.sqlite"]
