//! End-to-end tests: controller and agents talking over TLS on loopback ports.

mod arb;
mod bootstrap;
mod common;
mod security;
mod streaming;
