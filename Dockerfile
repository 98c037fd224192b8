# p2p-node in a small image: a static (musl) binary on Alpine, running as a non-root user.
#
#   docker build -t p2p-node:0.1.0 .
#   docker run --rm p2p-node:0.1.0 --version
#   docker run -d --name node -p 7400:7400 \
#     -e P2P_TYPES=a -e P2P_KEY_FILE=/run/p2p-node/cluster.key \
#     -v "$PWD/cluster.key:/run/p2p-node/cluster.key:ro" p2p-node:0.1.0
#
# The key file must pass the node's permission check inside the container: mode 0600 or 0400
# owned by uid 10001 (`chown 10001 cluster.key`), or 0440 with group 10001 (see
# docs/SECURITY.md). Docker's own secrets are mounted world-readable (0444) unless given a
# mode, and are then refused.
#
# The build stage runs on Alpine, where Rust's host target is x86_64-unknown-linux-musl (or
# the arm64 one), so the binary is statically linked without a cross toolchain. Not built in
# this repository's CI (no container engine there); the musl build itself was checked outside
# Docker (`cargo build --release --target x86_64-unknown-linux-musl -p node-cli`: static-pie).

FROM rust:1.89-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
# No .git in the build context (.dockerignore): `--version` says "commit unknown".
RUN cargo build --locked --profile dist -p node-cli --bin p2p-node \
    && cp target/dist/p2p-node /p2p-node

# Alpine rather than scratch: shell handlers (`--handler 'a=...'`) need /bin/sh.
FROM alpine:3.22
RUN adduser -D -H -u 10001 -s /sbin/nologin p2p \
    && mkdir -p /data \
    && chown 10001:10001 /data \
    && chmod 0700 /data
COPY --from=build /p2p-node /usr/local/bin/p2p-node
USER 10001:10001
# The node's identity lives here (mount a volume to keep its id across containers).
ENV P2P_DATA_DIR=/data
VOLUME ["/data"]
# Connections (TCP), and udp discovery beacons.
EXPOSE 7400/tcp 7450/udp
ENTRYPOINT ["/usr/local/bin/p2p-node"]
# serve needs its types: P2P_TYPES, or arguments after the image name.
CMD ["serve"]
