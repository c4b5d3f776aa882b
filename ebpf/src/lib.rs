#![no_std]
// The library target exists so the agent can declare a build-dependency on this crate (and be
// rebuilt when it changes); the programs live in the `weir` binary target.
