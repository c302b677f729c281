//! Generates the gRPC code from `weft/v1/*.proto` with a vendored `protoc`,
//! so a fresh checkout builds without a system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts are single-threaded; prost-build reads PROTOC.
    unsafe_set_protoc(&protoc);
    tonic_prost_build::configure()
        .compile_protos(&["weft/v1/agent.proto", "weft/v1/admin.proto"], &["."])?;
    println!("cargo:rerun-if-changed=weft");
    Ok(())
}

#[allow(unsafe_code)]
fn unsafe_set_protoc(path: &std::path::Path) {
    // SAFETY: the build script runs on one thread; nothing reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", path) };
}
