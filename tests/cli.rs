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

    // An --out directory that does not exist yet is made, for its holder alone.
    let fresh = dir.path().join("home/.tessera");
    let f = fresh.to_str().unwrap();
    let out = tessera(&[
        "cert", "issue", "--dir", d, "--role", "admin", "--name", "ops", "--out", f,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(fresh.join("ops.key").exists());
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
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

/// crc32c of a file, or None when it does not exist.
fn digest(path: &Path) -> Option<u32> {
    std::fs::read(path).ok().map(|bytes| crc32c::crc32c(&bytes))
}

/// Bad settings, certificates and data files: each is refused at start with
/// one line that names the setting or file, and no data file is created or
/// changed (compared by checksum).
#[test]
fn bad_storage_starts_create_and_change_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let c = at("cluster");
    assert!(tessera(&["cluster", "init", "--dir", &c]).status.success());
    for name in ["s1", "s2"] {
        let issued = tessera(&[
            "cert", "issue", "--dir", &c, "--role", "storage", "--name", name,
        ]);
        assert!(issued.status.success(), "{}", stderr(&issued));
    }
    // s9: s1's certificate with s2's key; s8: a certificate of another cluster.
    let cluster = Path::new(&c);
    std::fs::copy(cluster.join("s1.crt"), cluster.join("s9.crt")).unwrap();
    std::fs::copy(cluster.join("s2.key"), cluster.join("s9.key")).unwrap();
    let other = at("other");
    assert!(
        tessera(&["cluster", "init", "--dir", &other])
            .status
            .success()
    );
    let issued = tessera(&[
        "cert", "issue", "--dir", &other, "--role", "storage", "--name", "s8",
    ]);
    assert!(issued.status.success(), "{}", stderr(&issued));
    for file in ["s8.crt", "s8.key"] {
        std::fs::copy(Path::new(&other).join(file), cluster.join(file)).unwrap();
    }
    let config = |name: &str, text: &str| {
        let path = at(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let start = |data: &str, name: &str, extra: &[&str]| {
        let mut args = vec![
            "storage",
            "--data",
            data,
            "--listen",
            "127.0.0.1:0",
            "--cluster-dir",
            &c,
            "--name",
            name,
        ];
        args.extend_from_slice(extra);
        tessera(&args)
    };

    let slot = config("slot.toml", "slot_size = \"3K\"\n");
    let huge_slot = config("huge-slot.toml", "slot_size = \"8G\"\n");
    let region = config("region.toml", "region_size = \"1K\"\n");
    let volumes = config("volumes.toml", "max_volumes = 0\n");
    let boolean = config("bool.toml", "data = \"x.img\"\nsize = true\n");
    let syntax = config("syntax.toml", "size = \"1G\n");
    let keepalive = config("keepalive.toml", "[transport]\nkeep_alive_ms = 0\n");
    let unknown = config("unknown.toml", "sise = \"1G\"\n");
    // A port in use fails the start before any data file is touched.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = busy.local_addr().unwrap().to_string();
    let taken_message = format!("cannot serve metrics on {taken}");
    let cases: Vec<(&str, Vec<&str>, Vec<&str>)> = vec![
        (
            "s1",
            vec!["--size", "4K"],
            vec!["size = 4 KiB: 4 KiB is too small: at least"],
        ),
        (
            "s1",
            vec!["--size", "10X"],
            vec!["invalid size \"10X\": unknown unit"],
        ),
        (
            "s1",
            vec!["--config", &slot],
            vec!["slot.toml", "slot_size = 3 KiB: must be a power of two"],
        ),
        (
            "s1",
            vec!["--config", &huge_slot],
            vec!["slot_size = 8 GiB: must be under 4 GiB"],
        ),
        (
            "s1",
            vec!["--config", &region],
            vec!["region_size = 1 KiB: must be a power of two from 4 KiB to 16 MiB"],
        ),
        (
            "s1",
            vec!["--config", &volumes],
            vec!["max_volumes = 0: must be from 1 to 65536"],
        ),
        (
            "s1",
            vec!["--config", &boolean],
            vec!["bool.toml, line 2, column 8: invalid type: boolean `true`, expected a size"],
        ),
        (
            "s1",
            vec!["--config", &syntax],
            vec!["syntax.toml, line 1, column"],
        ),
        (
            "s1",
            vec!["--config", &keepalive],
            vec!["transport.keep_alive_ms = 0: must be at least 1"],
        ),
        (
            "s1",
            vec!["--config", &unknown],
            vec!["unknown.toml, line 1, column 1: unknown field `sise`"],
        ),
        (
            "s9",
            vec![],
            vec!["s9.key does not belong to the certificate", "s9.crt"],
        ),
        (
            "s8",
            vec![],
            vec!["s8.crt is not a valid certificate of the cluster CA"],
        ),
        ("s1", vec!["--metrics", &taken], vec![&taken_message]),
    ];

    // A data file that does not exist yet is not created.
    let new = at("new.img");
    for (name, extra, needles) in &cases {
        let out = start(&new, name, extra);
        let err = stderr(&out);
        assert!(!out.status.success(), "{extra:?} started");
        for needle in needles {
            assert!(err.contains(needle), "{extra:?}: no {needle:?} in {err}");
        }
        assert_eq!(digest(Path::new(&new)), None, "{extra:?} created {new}");
    }

    // A formatted data file is not changed.
    let formatted = at("formatted.img");
    let format = tessera(&[
        "storage",
        "format",
        "--data",
        &formatted,
        "--size",
        "64M",
        "--cluster-dir",
        &c,
        "--name",
        "s1",
    ]);
    assert!(format.status.success(), "{}", stderr(&format));
    let before = digest(Path::new(&formatted));
    for (name, extra, needles) in &cases {
        let out = start(&formatted, name, extra);
        assert!(!out.status.success(), "{extra:?} started");
        assert!(
            stderr(&out).contains(needles[0]),
            "{extra:?}: {}",
            stderr(&out)
        );
        assert_eq!(
            digest(Path::new(&formatted)),
            before,
            "{extra:?} changed it"
        );
    }

    // Damaged data files: too small to hold a superblock, and truncated.
    let tiny = at("tiny.img");
    std::fs::write(&tiny, [7u8; 4096]).unwrap();
    let out = start(&tiny, "s1", &[]);
    assert_one_line_error(
        &out,
        "tiny.img is 4 KiB, too small to be a Tessera data file",
    );
    assert_eq!(digest(Path::new(&tiny)), Some(crc32c::crc32c(&[7u8; 4096])));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&formatted)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let truncated = digest(Path::new(&formatted));
    let out = start(&formatted, "s1", &[]);
    assert_one_line_error(&out, "formatted.img is 1 MiB but was formatted with 64 MiB");
    assert_eq!(digest(Path::new(&formatted)), truncated);

    // An operating-system error is printed once.
    let missing = tessera(&[
        "storage",
        "--data",
        &new,
        "--cluster-dir",
        &at("nowhere"),
        "--name",
        "s1",
    ]);
    assert_one_line_error(&missing, "No such file or directory (os error 2)");
    assert_eq!(
        stderr(&missing).matches("os error 2").count(),
        1,
        "{}",
        stderr(&missing)
    );
}

/// A data file whose space cannot be reserved (ENOSPC from fallocate) fails
/// the start and gives the space back: a file that existed keeps its old
/// length, one the start created is gone. Needs root, for a small tmpfs.
#[test]
fn a_start_without_room_gives_the_space_back() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: needs root to mount a small tmpfs");
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let c = dir.path().join("cluster");
    let c = c.to_str().unwrap();
    assert!(tessera(&["cluster", "init", "--dir", c]).status.success());
    let issued = tessera(&[
        "cert", "issue", "--dir", c, "--role", "storage", "--name", "s1",
    ]);
    assert!(issued.status.success(), "{}", stderr(&issued));
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16M", "tessera-test"])
        .arg(&small)
        .status()
        .unwrap();
    if !mounted.success() {
        println!("SKIPPED: this machine does not let root mount a tmpfs");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&small);
    let existing = small.join("existing.img");
    std::fs::write(&existing, b"").unwrap();
    let absent = small.join("absent.img");
    for data in [&existing, &absent] {
        let out = tessera(&[
            "storage",
            "--data",
            data.to_str().unwrap(),
            "--size",
            "64M",
            "--io-engine",
            "std",
            "--listen",
            "127.0.0.1:0",
            "--cluster-dir",
            c,
            "--name",
            "s1",
        ]);
        assert_one_line_error(&out, "No space left on device");
        assert!(
            stderr(&out).contains("reserve space for"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::metadata(&existing).unwrap().len(), 0);
    assert!(!absent.exists(), "the start left the file it created");
}

/// A server whose address is taken says so once, naming the address, and
/// leaves nothing behind.
#[test]
fn a_taken_address_is_one_error_and_creates_nothing() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let c = dir.path().join("cluster");
    let c = c.to_str().unwrap();
    assert!(tessera(&["cluster", "init", "--dir", c]).status.success());
    for (role, name) in [("mgmt", "mgmt"), ("storage", "s1")] {
        let issued = tessera(&["cert", "issue", "--dir", c, "--role", role, "--name", name]);
        assert!(issued.status.success(), "{}", stderr(&issued));
    }
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let state = dir.path().join("mgmt-state");
    let out = tessera(&[
        "mgmt",
        "--listen",
        &addr,
        "--state",
        state.to_str().unwrap(),
        "--cluster-dir",
        c,
        "--name",
        "mgmt",
    ]);
    assert_one_line_error(&out, &format!("cannot serve on {addr}"));
    assert_eq!(
        stderr(&out).matches("in use").count(),
        1,
        "{}",
        stderr(&out)
    );
    assert!(
        !state.exists(),
        "a failed start created {}",
        state.display()
    );
    let data = dir.path().join("s1.img");
    let out = tessera(&[
        "storage",
        "--listen",
        &addr,
        "--data",
        data.to_str().unwrap(),
        "--size",
        "64M",
        "--cluster-dir",
        c,
        "--name",
        "s1",
    ]);
    assert_one_line_error(&out, &format!("cannot serve data on {addr}"));
    assert_eq!(
        stderr(&out).matches("in use").count(),
        1,
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "a failed start created {}", data.display());
}
