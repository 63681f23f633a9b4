# Herald's container image: the `herald` binary, one role per first argument
#   docker run ghcr.io/herald-push/herald:0.1.0 standalone
#   docker run ghcr.io/herald-push/herald:0.1.0 comet --help
#
# Build: `docker build .` or `podman build .` (needs a registry for the base
# images). scripts/image.sh builds this same file with buildah; without a
# registry (the test command) it passes bases it made with mmdebstrap as
# RUST_IMAGE and RUNTIME_IMAGE. docs/image.md has the details.

# The build stage: any Debian bookworm with a Rust toolchain (cargo on PATH), a
# C compiler, make, pkg-config, zlib's and OpenSSL's headers (librdkafka is
# compiled from source with TLS and SASL; the binary links zlib, OpenSSL and
# glibc dynamically; OpenSSL's two libraries are copied into the runtime
# stage, whose base need not have them).
ARG RUST_IMAGE=docker.io/library/rust:1.95-bookworm
# The runtime stage: glibc, zlib and libgcc_s are all the binary needs.
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /build/src
COPY . .
# true: build from the crates already in $CARGO_HOME/registry (scripts/image.sh
# mounts them there when the build cannot reach crates.io).
ARG CARGO_NET_OFFLINE=false
# Release build without debug info, symbols stripped by the linker.
ENV CARGO_TARGET_DIR=/build/target \
    CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_TERM_COLOR=never
RUN cargo build --release --locked -p herald \
 && install -D -m 0755 "$CARGO_TARGET_DIR/release/herald" /out/herald \
 && /out/herald --version \
 && mkdir -p /out/lib \
 && for lib in $(ldd /out/herald | awk '/libssl|libcrypto/ { print $3 }'); do cp -L "$lib" /out/lib/; done

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/herald-push/herald
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Herald: a goim-compatible push platform (comet, logic, job, operator) in one binary" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/lib/ /usr/lib/
COPY --from=build /out/herald /usr/local/bin/herald
# goim's ports: client TCP, WebSocket, comet gRPC, logic HTTP API, logic gRPC.
EXPOSE 3101 3102 3109 3111 3119 3190
# Not root: a fixed uid without a passwd entry, as distroless' "nonroot".
USER 65532:65532
ENTRYPOINT ["herald"]
CMD ["--help"]
