#![doc = include_str!("../README.md")]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod audit;
mod clock;
pub mod error;
pub mod guard;
pub mod invalidate;
pub mod key;
pub mod layer;
#[cfg(feature = "leaks")]
pub mod leaks;
mod life;
pub mod manage;
pub mod metrics;
pub mod network;
pub mod principal;
#[cfg(feature = "provenance")]
pub mod provenance;
pub mod quota;
#[cfg(feature = "ratelimit")]
pub mod ratelimit;
pub mod resolver;
pub mod scope;
pub mod store;
mod throttle;
pub mod usage;
