//! Replays the checked-in fuzz corpus: every file under `fuzz/regressions/<target>/` (crashes
//! the fuzzer found, minimised, and a few seeds) through its entry function. A panic fails the
//! test and names the file.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use whittle_fuzz_entries::TARGETS;

fn regressions() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions")
}

fn files_of(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
}

#[test]
fn every_regression_file_replays_without_a_panic() {
    let root = regressions();
    let mut failures = Vec::new();
    for (target, entry) in TARGETS {
        let files = files_of(&root.join(target));
        assert!(
            !files.is_empty(),
            "fuzz/regressions/{target}/ holds no files (it keeps at least one seed)"
        );
        for file in files {
            let data = std::fs::read(&file).unwrap();
            if catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err() {
                failures.push(format!("{target}: {}", file.display()));
            }
        }
    }
    assert!(failures.is_empty(), "panicked on:\n{}", failures.join("\n"));
}

#[test]
fn every_target_has_a_fuzz_target_and_a_regressions_folder() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
    for (target, _) in TARGETS {
        let source = fuzz.join(format!("fuzz_targets/{target}.rs"));
        let text = std::fs::read_to_string(&source)
            .unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        assert!(
            text.contains(&format!("whittle_fuzz_entries::{target}(")),
            "{} does not call whittle_fuzz_entries::{target}",
            source.display()
        );
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/Cargo.toml has no [[bin]] {target}"
        );
        assert!(regressions().join(target).is_dir());
    }
}

#[test]
fn empty_and_tiny_inputs_do_not_panic() {
    for (_, entry) in TARGETS {
        for data in [&b""[..], b"\0", b"PK", b"\xff\xff", b"[preprocess]\n"] {
            entry(data);
        }
    }
}
