//! The `tessera` binary as a user runs it.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_subcommands() {
    let out = tessera(&["--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for sub in [
        "cluster", "cert", "storage", "mgmt", "volume", "server", "status", "RUST_LOG",
    ] {
        assert!(text.contains(sub), "--help lacks {sub}:\n{text}");
    }
}

#[test]
fn cluster_init_and_cert_issue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = tessera(&["cluster", "init", "--dir", d]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(dir.path().join("ca.crt").exists());

    let out = tessera(&[
        "cert", "issue", "--dir", d, "--role", "client", "--name", "app-1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = std::fs::metadata(dir.path().join("app-1.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(stdout(&out).contains("app-1.crt"));

    let out_dir = dir.path().join("elsewhere");
    std::fs::create_dir(&out_dir).unwrap();
    let o = out_dir.to_str().unwrap();
    let out = tessera(&[
        "cert", "issue", "--dir", d, "--role", "admin", "--name", "ops", "--out", o,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(Path::new(o).join("ops.key").exists());
}

/// Every failure is one clear line on stderr and a non-zero exit code.
fn assert_one_line_error(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    let err = stderr(out);
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{err}"
    );
}

#[test]
fn errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_one_line_error(
        &tessera(&[
            "cert", "issue", "--dir", d, "--role", "client", "--name", "x",
        ]),
        "ca.crt",
    );
    assert!(tessera(&["cluster", "init", "--dir", d]).status.success());
    assert_one_line_error(&tessera(&["cluster", "init", "--dir", d]), "already exists");
    assert_one_line_error(
        &tessera(&[
            "cert", "issue", "--dir", d, "--role", "client", "--name", "Bad_Name",
        ]),
        "invalid name",
    );
    assert!(
        tessera(&[
            "cert", "issue", "--dir", d, "--role", "client", "--name", "a"
        ])
        .status
        .success()
    );
    assert_one_line_error(
        &tessera(&[
            "cert", "issue", "--dir", d, "--role", "client", "--name", "a",
        ]),
        "already exists",
    );
    // A damaged CA key is an error, not a panic.
    std::fs::write(dir.path().join("ca.key"), "garbage").unwrap();
    assert_one_line_error(
        &tessera(&[
            "cert", "issue", "--dir", d, "--role", "client", "--name", "b",
        ]),
        "ca.key",
    );
}

#[test]
fn unknown_role_is_a_usage_error() {
    let out = tessera(&[
        "cert",
        "issue",
        "--dir",
        "/nonexistent",
        "--role",
        "root",
        "--name",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown role"), "{}", stderr(&out));
}
