//! Generates the gRPC code for both real and simulated (madsim) builds with the vendored
//! protoc, so neither developers nor CI need a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    madsim_tonic_build::configure().build_server(true).build_client(true).compile_protos_with_config(
        config,
        &["proto/mas.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/mas.proto");
    Ok(())
}
