//! Names the tests of this package that this build skips for a missing feature. Cargo builds a
//! test binary with `required-features` only when they are on, and the MPI and wgpu cases
//! compile to nothing without `mpi` / `wgpu`, so a plain `cargo test -p ballast` would skip
//! them without a word. This binary needs no feature: it reads the manifest and the test
//! sources, prints what is skipped and why, and fails under `CI` (which runs every test).

use std::path::Path;

/// Whether this build has `feature` on.
fn enabled(feature: &str) -> bool {
    let on = [
        ("cli", cfg!(feature = "cli")),
        ("testkit", cfg!(feature = "testkit")),
        ("mpi", cfg!(feature = "mpi")),
        ("wgpu", cfg!(feature = "wgpu")),
        ("cuda", cfg!(feature = "cuda")),
    ];
    on.iter().any(|&(name, enabled)| name == feature && enabled)
}

/// `(name, required features)` of every `[[test]]` table of the manifest.
fn test_targets(manifest: &str) -> Vec<(String, Vec<String>)> {
    manifest
        .split("[[test]]")
        .skip(1)
        .map(|table| {
            let body = table.split("\n[").next().unwrap_or("");
            let value = |key: &str| {
                body.lines()
                    .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix('=').map(str::trim))
                    .unwrap_or("")
                    .to_string()
            };
            let name = value("name").trim_matches('"').to_string();
            let features = value("required-features")
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|f| f.trim().trim_matches('"').to_string())
                .filter(|f| !f.is_empty())
                .collect();
            (name, features)
        })
        .collect()
}

#[test]
fn tests_skipped_for_a_missing_feature_are_named() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let targets = test_targets(&manifest);
    assert!(
        targets.iter().any(|(name, _)| name == "balance"),
        "the manifest's [[test]] tables were not read: {targets:?}"
    );
    let mut skipped = Vec::new();
    for (name, features) in &targets {
        let missing: Vec<&str> = features.iter().map(String::as_str).filter(|f| !enabled(f)).collect();
        if !missing.is_empty() {
            skipped.push(format!("tests/{name}.rs (needs {})", missing.join(", ")));
            continue;
        }
        let source = std::fs::read_to_string(root.join("tests").join(format!("{name}.rs"))).unwrap_or_default();
        for feature in ["mpi", "wgpu"] {
            if !enabled(feature) && source.contains(&format!("feature = \"{feature}\"")) {
                skipped.push(format!("the {feature} cases of tests/{name}.rs (need {feature})"));
            }
        }
    }
    if skipped.is_empty() {
        println!("no test of this package is skipped for a missing feature");
        return;
    }
    println!(
        "skipped, for features this build lacks: {}. Run ./scripts/test-all.sh, which turns every one on",
        skipped.join("; ")
    );
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs every test, but this build skips: {skipped:?}"
    );
}
