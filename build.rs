//! Build script of `tower-api-keys`.
//!
//! For library users it does nothing: it only generates code for the `grpc-example` feature (the
//! tonic example and its tests), whose build-dependencies are optional, so a normal build compiles
//! no extra crate and runs no `protoc`.

fn main() {
    #[cfg(feature = "grpc-example")]
    grpc_example::generate();

    // Without this line cargo would re-run the script whenever any file of the package changes.
    println!("cargo::rerun-if-changed=build.rs");
}

#[cfg(feature = "grpc-example")]
mod grpc_example {
    /// Generates `ledger.v1.rs` (messages, client and server of `proto/ledger.proto`) in `OUT_DIR`
    /// with the `protoc` shipped by `protoc-bin-vendored` (no system install needed), or the one
    /// `PROTOC` names.
    pub(super) fn generate() {
        println!("cargo::rerun-if-env-changed=PROTOC");
        // Regenerate when the proto changes (the builder does not say so itself here).
        println!("cargo::rerun-if-changed=proto/ledger.proto");
        let protoc = match std::env::var_os("PROTOC") {
            Some(path) => std::path::PathBuf::from(path),
            None => protoc_bin_vendored::protoc_bin_path()
                .expect("protoc-bin-vendored has no protoc for this platform: set PROTOC"),
        };
        let mut config = tonic_prost_build::Config::new();
        config.protoc_executable(protoc);
        tonic_prost_build::configure()
            .compile_with_config(config, &["proto/ledger.proto"], &["proto"])
            .expect("compiling proto/ledger.proto");
    }
}
