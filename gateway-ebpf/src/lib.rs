//! Host-side stub: the kernel program lives in `main.rs` and only builds for `bpfel-unknown-none`.
//! The library target exists so that `gateway`'s build script can depend on this crate.
#![no_std]
