# syntax=docker/dockerfile:1
#
# weir's container image, for those who build with Docker:
#
#   docker build -t weir:dev .
#
# `cargo xtask image` builds the same image without Docker and is what the repository's
# tooling uses (xtask/src/image.rs). Both put the three binaries in /usr/local/bin, set no
# entrypoint (manifests/ names the binary in every container's `command`) and link the CNI
# plugin statically, because the init container copies it to the node, where the container
# runtime runs it against the node's own libc.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# The eBPF toolchain `cargo xtask setup` installs: nightly with rust-src, and bpf-linker built
# against the nightly's own LLVM. (setup itself also mounts bpffs, which a build container may
# not do, so its toolchain steps are repeated here.)
RUN rustup toolchain install nightly --profile minimal --component rust-src
RUN set -eu; \
    major="$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"; \
    lib="$(rustc +nightly --print sysroot)/lib"; \
    llvm="$(ls "$lib" | grep "^libLLVM.so.$major" | head -n 1)"; \
    mkdir -p /opt/weir-llvm/lib; \
    ln -s "$lib/$llvm" /opt/weir-llvm/lib/libLLVM.so; \
    ln -s "$lib/$llvm" "/opt/weir-llvm/lib/$llvm"; \
    LLVM_PREFIX=/opt/weir-llvm cargo install bpf-linker --locked --no-default-features \
        --features "llvm-$major"
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    host="$(rustc -vV | sed -n 's/^host: //p')"; \
    cargo build --release -p weir-agent --bin weir-agent -p weir-controller --bin weir-controller; \
    CARGO_ENCODED_RUSTFLAGS=-Ctarget-feature=+crt-static \
        cargo build --release -p weir-cni --bin weir-cni --target "$host"; \
    mkdir -p /out; \
    cp target/release/weir-agent target/release/weir-controller "target/$host/release/weir-cni" /out/

# Debian, like the build host of `cargo xtask image`: the agent and the controller run on the
# glibc they were linked against, and /bin/sh, cp, chmod and mv serve the CNI-install init
# container.
FROM debian:bookworm-slim
LABEL org.opencontainers.image.title="weir" \
      org.opencontainers.image.description="weir eBPF network policy and routing: weir-agent, weir-controller, weir-cni"
COPY --from=builder /out/ /usr/local/bin/
CMD ["/usr/local/bin/weir-agent", "--help"]
