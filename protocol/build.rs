//! Compiles the `.proto` files with protox (a pure-Rust protobuf compiler), so
//! building Herald needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/protocol.proto",
        "proto/comet.proto",
        "proto/logic.proto",
        "proto/admin.proto",
        "proto/push.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // goim's Logic service has an rpc named `Connect`, which collides with
        // the generated `LogicClient::connect` constructor; clients are built
        // from a `Channel` with `new` instead.
        .build_transport(false)
        .bytes(".")
        .compile_fds(descriptors)?;
    Ok(())
}
