//! Build script: tells the integration tests which outside services this machine offers.
//!
//! A test that needs PostgreSQL, the Python SDK, Chromium or root used to return early and pass
//! when its service was missing, so `cargo test` said `ok` for a test that never ran. Each such
//! test now carries `#[cfg_attr(not(<cfg>), ignore = "…")]`: without its variable at build time it
//! is counted as ignored in the summary, with it the test runs (and fails if the service is
//! broken). The README's "Two commands" section names every variable; `.ci/run` sets all of them.
//!
//! Only the tests read these cfgs: the binary and the library build the same with or without
//! them (the Docker image copies this file only because cargo runs it for every build).

/// Each variable that enables tests, and the cfg it sets when present and not empty.
const SERVICES: &[(&str, &str)] = &[
    ("OPENAI_API_ROUTE_TEST_POSTGRES", "test_postgres"),
    ("OPENAI_SDK_PYTHON", "test_sdk_python"),
    ("OPENAI_API_ROUTE_TEST_CHROMIUM", "test_chromium"),
    ("OPENAI_API_ROUTE_TEST_ROOT", "test_root"),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    let mut listed = Vec::new();
    for (var, cfg) in SERVICES {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg({cfg})");
        let on = std::env::var_os(var).is_some_and(|v| !v.is_empty());
        if on {
            println!("cargo::rustc-cfg={cfg}");
        }
        listed.push(format!("{var}={}", if on { "on" } else { "off" }));
    }
    // The tests check that CI enables every one and that the README names every one.
    println!(
        "cargo::rustc-env=OPENAI_API_ROUTE_TEST_SERVICES={}",
        listed.join(",")
    );
}
