//! `tessera`: the one command-line binary of the Tessera block storage system.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tessera_net::proto::Role;
use tessera_net::quic::certs::{CA_CERT_FILE, ClusterCa};
use tracing_subscriber::EnvFilter;

mod admin;
mod bench_cmd;
mod demo;
mod local;
mod mgmt_cmd;
mod mirror_cmd;
mod nbd_cmd;
mod runtime;
mod storage;
mod tls;

/// Tessera: distributed block storage with epoch-fenced mirrors over QUIC.
///
/// Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug or
/// RUST_LOG=tessera_net=trace) to change what is shown.
#[derive(Debug, Parser)]
#[command(name = "tessera", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a local cluster (./tessera-demo): 1 management and 3 storage
    /// servers, a volume, served over NBD until Ctrl-C.
    Demo(demo::DemoCommand),
    /// Create and inspect the cluster's certificate authority.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Issue certificates signed by the cluster CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Run a storage server, or format its data file (`tessera storage format`).
    Storage(Box<storage::StorageCommand>),
    /// Run the management server.
    Mgmt(mgmt_cmd::MgmtCommand),
    /// Serve a volume over NBD.
    Nbd(nbd_cmd::NbdCommand),
    /// Create, list, show, partition, resize and delete volumes (admin).
    Volume {
        #[command(subcommand)]
        command: admin::VolumeCommand,
        #[command(flatten)]
        connection: admin::Connection,
    },
    /// List and remove storage servers (admin).
    Server {
        #[command(subcommand)]
        command: admin::ServerCommand,
        #[command(flatten)]
        connection: admin::Connection,
    },
    /// Servers, volumes, epochs and mirror states (admin).
    Status {
        #[command(flatten)]
        connection: admin::Connection,
    },
    /// Benchmark workloads through the driver (a local cluster by default).
    Bench(Box<bench_cmd::BenchCommand>),
    /// Mirror states of a volume, and waiting for resyncs (admin).
    Mirror {
        #[command(subcommand)]
        command: mirror_cmd::MirrorCommand,
        #[command(flatten)]
        connection: admin::Connection,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Make a new cluster CA (ca.crt, ca.key) in DIR.
    Init(ClusterInit),
}

#[derive(Debug, Args)]
struct ClusterInit {
    /// Directory for the cluster's CA and certificates (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// Cluster name, recorded in the CA certificate.
    #[arg(long, default_value = "tessera")]
    name: String,
    /// Days the CA stays valid.
    #[arg(long, default_value_t = 3650)]
    days: u32,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Issue a certificate and key (NAME.crt, NAME.key with mode 0600).
    Issue(CertIssue),
}

#[derive(Debug, Args)]
struct CertIssue {
    /// Cluster directory holding ca.crt and ca.key.
    #[arg(long)]
    dir: PathBuf,
    /// What the holder may do: mgmt, storage, client or admin.
    #[arg(long)]
    role: Role,
    /// Holder name: lowercase letters, digits and '-'; servers are dialed by it.
    #[arg(long)]
    name: String,
    /// Where to write NAME.crt and NAME.key [default: --dir].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Days the certificate stays valid.
    #[arg(long, default_value_t = 825)]
    days: u32,
}

/// Colour only on a terminal, and never with `NO_COLOR` set (no-color.org):
/// logs written to a file or a pipe stay plain text.
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", render(&e));
            ExitCode::FAILURE
        }
    }
}

/// One line: the error and its causes, outermost first. A cause whose text
/// the line already holds (errors that print their source, and return it
/// too) is not repeated.
fn render(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(command) => demo::run(command),
        Command::Bench(command) => bench_cmd::run(*command),
        Command::Cluster(ClusterCommand::Init(args)) => cluster_init(args),
        Command::Cert(CertCommand::Issue(args)) => cert_issue(args),
        Command::Storage(command) => storage::run(*command),
        Command::Mgmt(command) => mgmt_cmd::run(command),
        Command::Nbd(command) => nbd_cmd::run(command),
        Command::Volume {
            command,
            connection,
        } => admin::volume(&connection, command),
        Command::Server {
            command,
            connection,
        } => admin::server(&connection, command),
        Command::Status { connection } => admin::status(&connection),
        Command::Mirror {
            command,
            connection,
        } => mirror_cmd::run(&connection, command),
    }
}

fn cluster_init(args: ClusterInit) -> anyhow::Result<()> {
    let ca = ClusterCa::generate(&args.name, args.days).context("cannot make the cluster CA")?;
    ca.save(&args.dir).context("cannot save the cluster CA")?;
    println!(
        "cluster {:?}: CA written to {}",
        args.name,
        args.dir.join(CA_CERT_FILE).display()
    );
    Ok(())
}

fn cert_issue(args: CertIssue) -> anyhow::Result<()> {
    let ca = ClusterCa::load(&args.dir).context("cannot load the cluster CA")?;
    let issued = ca
        .issue(args.role, &args.name, args.days)
        .context("cannot issue the certificate")?;
    let out = args.out.as_deref().unwrap_or(&args.dir);
    // Keys go in: a new directory is the holder's alone.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .with_context(|| format!("cannot create {}", out.display()))?;
    let (cert, key) = issued
        .save(out, &args.name)
        .context("cannot save the certificate")?;
    println!(
        "{} {:?}: certificate {}, key {}",
        args.role,
        args.name,
        cert.display(),
        key.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let os = std::io::Error::from_raw_os_error(libc::ENOENT);
        let engine = tessera_engine::error::EngineError::Io {
            op: "open",
            path: "/srv/x.img".into(),
            source: os,
        };
        let error = anyhow::Error::new(engine).context("cannot start");
        assert_eq!(
            render(&error),
            "cannot start: open /srv/x.img: No such file or directory (os error 2)"
        );
        // A cause the message lacks is still shown.
        let error = anyhow::anyhow!("inner detail").context("outer");
        assert_eq!(render(&error), "outer: inner detail");
    }
}
