//! Generates the gRPC code for both real and simulated (madsim) builds with the vendored
//! protoc, so neither developers nor CI need a system `protoc`.

const PROTOS: [&str; 3] = ["proto/mas.proto", "proto/mas_v1.proto", "proto/mas_admin.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The simulated code (and a first cut of the real one).
    madsim_tonic_build::configure().build_server(true).build_client(true).compile_protos_with_config(
        protoc_config()?,
        &PROTOS,
        &["proto"],
    )?;
    // The real code again, over our codec (see `src/codec.rs`): madsim-tonic-build has no
    // `codec_path`, and the real build is the one that allocates buffers.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::LeanCodec")
        .compile_with_config(protoc_config()?, &PROTOS, &["proto"])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}

fn protoc_config() -> Result<prost_build::Config, Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    Ok(config)
}
