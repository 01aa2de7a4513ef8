//! The integration tests, one module per file, in one crate: the helpers
//! in `common` are shared (a helper no test uses is a dead-code warning)
//! and there is one test binary to build. `cargo test --test suite chats::`
//! runs one file; the `*_e2e` modules and the systemd check are
//! `#[ignore]`d (`-- --include-ignored` runs them).
//!
//! Cargo does not discover `tests/*.rs` on its own here (`autotests = false`
//! in Cargo.toml): a new file is a `mod` line below, which
//! `every_test_file_is_a_module` checks.

mod common;

mod chats;
mod chats_e2e;
mod doctor;
mod events;
mod hooks;
mod integration;
mod plans;
mod providers;
mod providers_e2e;
mod repos;
mod system;
mod upstream;

#[test]
fn every_test_file_is_a_module() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let main = include_str!("main.rs");
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && name != "main" {
            assert!(
                main.contains(&format!("\nmod {name};\n")),
                "tests/{name}.rs is not a module of tests/main.rs, so it never runs"
            );
        }
    }
}
