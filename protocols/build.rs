//! Generates the agent API's Rust code (messages and ttrpc services) from `protos/agent.proto` with
//! the pure-Rust protobuf code generator (no `protoc`). The generated files open with inner
//! attributes, which `include!` inside a module does not accept; they are stripped here (lib.rs
//! carries the allows instead).

use std::fs;
use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["protos/agent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("generated");
    fs::create_dir_all(&out)?;
    Codegen::new()
        .out_dir(&out)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize { async_all: true, ..Default::default() })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    for entry in fs::read_dir(&out)? {
        let path = entry?.path();
        let text = fs::read_to_string(&path)?;
        let kept: Vec<&str> = text.lines().filter(|line| !is_inner_attribute_or_doc(line)).collect();
        fs::write(&path, kept.join("\n"))?;
    }
    Ok(())
}

/// `#![...]` and `//!` lines, which may only open a file or module, not follow `include!`.
fn is_inner_attribute_or_doc(line: &str) -> bool {
    let line = line.trim_start();
    line.starts_with("#![") || line.starts_with("//!")
}
