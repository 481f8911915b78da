//! `tessera demo --check`: the whole first-run experience, twice (the second run reuses the cluster).
#![allow(clippy::unwrap_used)]

mod common;

use common::tessera;

#[test]
fn demo_check_runs_and_reuses_its_cluster() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let demo_dir = dir.path().join("tessera-demo");
    let run = || {
        let out = tessera()
            .args([
                "demo",
                "--check",
                "--nbd",
                "tcp:127.0.0.1:0",
                "--disk-size",
                "256M",
                "--volume-size",
                "384M",
                "--dir",
            ])
            .arg(&demo_dir)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "demo failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let first = run();
    assert!(first.contains("new cluster"), "{first}");
    assert!(
        first.contains("created volume demo: 384 MiB over 3 servers"),
        "{first}"
    );
    assert!(first.contains("wrote and verified"), "{first}");
    assert!(first.contains("nbdinfo nbd://127.0.0.1:"), "{first}");
    assert!(first.contains("demo check passed"), "{first}");
    let second = run();
    assert!(second.contains("reusing the cluster there"), "{second}");
    assert!(
        second.contains("volume demo exists: reusing it"),
        "{second}"
    );
    assert!(second.contains("demo check passed"), "{second}");
}
