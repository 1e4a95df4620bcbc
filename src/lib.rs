#![doc = include_str!("docs/crate.md")]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// `get_ref`, `get_mut` and `into_inner` for a middleware service whose wrapped service is its
/// `inner` field: the same three on every service of the crate, as in tower-http.
macro_rules! inner_service_accessors {
    ($service:ident < $($param:ident),+ >) => {
        impl<$($param),+> $service<$($param),+> {
            /// The wrapped service.
            pub fn get_ref(&self) -> &S {
                &self.inner
            }

            /// The wrapped service, mutably.
            pub fn get_mut(&mut self) -> &mut S {
                &mut self.inner
            }

            /// The wrapped service, unwrapped.
            pub fn into_inner(self) -> S {
                self.inner
            }
        }
    };
}

pub mod audit;
mod authorize;
mod clock;
pub mod error;
pub mod guard;
#[cfg(any(feature = "leaks", feature = "webhooks"))]
mod https;
pub mod invalidate;
pub mod key;
pub mod layer;
#[cfg(feature = "leaks")]
pub mod leaks;
mod life;
pub mod limits;
pub mod manage;
pub mod metrics;
pub mod network;
pub mod principal;
#[cfg(feature = "provenance")]
pub mod provenance;
#[cfg(feature = "ratelimit")]
pub mod ratelimit;
mod record;
mod refusal;
pub mod resolver;
pub mod scope;
pub mod store;
mod throttle;
pub mod usage;
#[cfg(feature = "webhooks")]
pub mod webhooks;

/// The README's Rust examples, compiled and run as doctests (the README is the repository's front
/// page; the crate's is `src/docs/crate.md`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
