//! Compiles `proto/coordinator.proto` with protox (pure Rust, no protoc) and
//! generates the tonic client and server.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/coordinator.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // Boxed: a failure without an error file stays small.
        .boxed(".cohort.v1.FailureInfo.error")
        .compile_fds(fds)?;
    Ok(())
}
