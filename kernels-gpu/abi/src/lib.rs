//! The one definition of everything the kvcompress host and its PTX kernels must agree on:
//! the cache layout and its index math ([`geometry`]), the launch parameter structs passed by
//! value to every kernel ([`params`]), the launch plans ([`plan`]) and the element types
//! ([`dtype`]).
//!
//! This crate is `no_std`, depends on nothing but `bytemuck`, and compiles both for the host
//! and for `nvptx64-nvidia-cuda`, so a layout can never differ between the two sides.
#![no_std]
#![warn(missing_docs)]

pub mod dtype;
pub mod geometry;
pub mod params;
pub mod plan;

pub use dtype::DType;
pub use geometry::{CacheView, Geometry};
