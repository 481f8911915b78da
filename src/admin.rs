//! Admin commands: talk to the management server with an admin certificate.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tessera_net::proto::{
    AdminCommand, ClusterStatus, MgmtReply, MgmtRequest, MirrorStatus, Role, VolumeMap,
};
use tessera_net::quic::{Alpn, Endpoint, TlsPaths, TransportTuning};
use tessera_net::units::ByteSize;

/// How to reach the management server, and as whom.
#[derive(Debug, Args)]
pub struct Connection {
    /// Management server address.
    #[arg(
        long,
        env = "TESSERA_MGMT",
        default_value = "127.0.0.1:7400",
        global = true
    )]
    mgmt: SocketAddr,
    /// The management server's certificate name.
    #[arg(long, env = "TESSERA_MGMT_NAME", default_value = "mgmt", global = true)]
    mgmt_name: String,
    /// Cluster directory holding ca.crt and the admin certificate.
    #[arg(long, env = "TESSERA_CLUSTER_DIR", default_value = ".", global = true)]
    cluster_dir: PathBuf,
    /// Name of the admin certificate in --cluster-dir.
    #[arg(long, env = "TESSERA_ADMIN", default_value = "admin", global = true)]
    admin: String,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a volume, laid out over the storage servers.
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: ByteSize,
        /// Unit of layout, e.g. 1M (a multiple of 4 KiB, at most 4 MiB).
        #[arg(long, default_value = "1M")]
        page_size: ByteSize,
        /// Copies of every page, on distinct servers.
        #[arg(long, default_value_t = 1)]
        replicas: u8,
        /// Place it on these servers only (comma-separated).
        #[arg(long, value_delimiter = ',')]
        servers: Option<Vec<String>>,
    },
    /// List volumes.
    List,
    /// Show a volume's layout.
    Show { name: String },
    /// Give a page range to other servers (refused while the servers losing
    /// pages hold data in them: moving data is not supported yet).
    Partition {
        name: String,
        /// Page range A..B (end exclusive), e.g. 0..64.
        #[arg(long, value_parser = parse_pages)]
        pages: (u64, u64),
        /// New replicas, primary first (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        servers: Vec<String>,
    },
    /// Grow or shrink a volume (a shrink that would drop written data is refused).
    Resize {
        name: String,
        #[arg(long)]
        size: ByteSize,
    },
    /// Compare a volume's replicas region by region (crc32c) and report
    /// every difference; exits 1 if any. Run it on a quiet volume: a write
    /// in flight shows as a difference until it lands everywhere.
    Verify {
        name: String,
        /// Compare in regions of this size.
        #[arg(long, default_value = "64K")]
        region: ByteSize,
    },
    /// Delete a volume and free its data on every server.
    Delete {
        name: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// List storage servers.
    List,
    /// Remove a storage server (refused while it holds data, unless --force).
    Remove {
        name: String,
        /// Remove it even though it holds partitions: they are marked lost.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
}

fn parse_pages(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text.split_once("..").ok_or("expected a page range A..B")?;
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("bad page number {a:?}"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("bad page number {b:?}"))?;
    if a >= b {
        return Err(format!("empty page range {a}..{b}"));
    }
    Ok((a, b))
}

impl Connection {
    /// The admin identity this connection presents.
    pub fn identity(&self) -> anyhow::Result<tessera_net::quic::TlsIdentity> {
        let tls = TlsPaths::in_dir(&self.cluster_dir, &self.admin);
        tls.load().context(
            "cannot load the admin certificate (set --cluster-dir and --admin, or TESSERA_CLUSTER_DIR)",
        )
    }

    pub fn mgmt_addr(&self) -> SocketAddr {
        self.mgmt
    }

    pub fn call(&self, request: MgmtRequest) -> anyhow::Result<MgmtReply> {
        let identity = self.identity()?;
        crate::runtime::current_thread()?.block_on(async {
            let endpoint = Endpoint::client(self.mgmt, &identity, &TransportTuning::default())?;
            let conn = endpoint
                .connect(self.mgmt, &self.mgmt_name, Alpn::Mgmt, Role::Mgmt)
                .await
                .with_context(|| format!("cannot reach the management server at {}", self.mgmt))?;
            let reply = conn.mgmt(&request).await?;
            endpoint.close();
            match reply {
                MgmtReply::Refused(refusal) => bail!("refused: {refusal}"),
                other => Ok(other),
            }
        })
    }

    pub fn print(&self, value: &impl serde::Serialize, human: impl FnOnce()) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human();
        }
        Ok(())
    }

    pub fn status(&self) -> anyhow::Result<ClusterStatus> {
        match self.call(MgmtRequest::Status)? {
            MgmtReply::Status(status) => Ok(status),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    /// Every mirror as the management server's monitor judges it.
    pub fn mirror_status(&self) -> anyhow::Result<Vec<MirrorStatus>> {
        match self.call(MgmtRequest::MirrorStatus)? {
            MgmtReply::MirrorStatus(mirrors) => Ok(mirrors),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    fn applied(&self, command: AdminCommand, what: &str) -> anyhow::Result<()> {
        match self.call(MgmtRequest::Admin(command))? {
            MgmtReply::Applied { epoch } => {
                let value = serde_json::json!({ "applied": what, "epoch": epoch.0 });
                self.print(&value, || println!("{what} (cluster epoch {})", epoch.0))
            }
            other => bail!("unexpected reply {other:?}"),
        }
    }
}

fn confirm(question: &str, yes: bool) -> anyhow::Result<()> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question}: not confirmed (pass --yes)");
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim().eq_ignore_ascii_case("y") || answer.trim().eq_ignore_ascii_case("yes") {
        Ok(())
    } else {
        bail!("{question}: not confirmed")
    }
}

fn print_volume_line(v: &VolumeMap) {
    let replicas = v.partitions.first().map_or(0, |p| p.replicas.len());
    println!(
        "{:<20} {:>10} {:>8} {:>4} {:>10} {:>8}",
        v.name,
        ByteSize(v.size).to_string(),
        ByteSize(u64::from(v.page_size)).to_string(),
        replicas,
        v.partitions.len(),
        v.epoch.0
    );
}

fn print_volume_header() {
    println!(
        "{:<20} {:>10} {:>8} {:>4} {:>10} {:>8}",
        "VOLUME", "SIZE", "PAGE", "REPL", "PARTITIONS", "EPOCH"
    );
}

/// `down`: the servers the management server counts as down.
fn print_layout(v: &VolumeMap, down: &[String]) {
    println!(
        "volume {} (id {}), {}, pages of {}, epoch {}",
        v.name,
        v.id.0,
        ByteSize(v.size),
        ByteSize(u64::from(v.page_size)),
        v.epoch.0
    );
    for p in &v.partitions {
        let replicas: Vec<String> = p
            .replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                format!(
                    "{}{} ({}{})",
                    r.server,
                    if i == 0 { "*" } else { "" },
                    crate::mirror_cmd::state_name(r.state),
                    if down.contains(&r.server) {
                        ", server down"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        println!(
            "  pages {:>8}..{:<8} {}",
            p.first_page,
            p.end_page,
            replicas.join(", ")
        );
    }
    println!("  (* = primary)");
}

pub fn volume(connection: &Connection, command: VolumeCommand) -> anyhow::Result<()> {
    match command {
        VolumeCommand::Create {
            name,
            size,
            page_size,
            replicas,
            servers,
        } => {
            let page_size = u32::try_from(page_size.0).context("page size too large")?;
            let what = format!("created volume {name} ({size})");
            connection.applied(
                AdminCommand::CreateVolume {
                    name,
                    size: size.0,
                    page_size,
                    replicas,
                    servers,
                },
                &what,
            )
        }
        VolumeCommand::List => {
            let status = connection.status()?;
            connection.print(&status.volumes, || {
                print_volume_header();
                status.volumes.iter().for_each(print_volume_line);
            })
        }
        VolumeCommand::Show { name } => {
            match connection.call(MgmtRequest::GetMap { volume: name })? {
                MgmtReply::Map(map) => {
                    // The table says which replicas' servers are down; the JSON is the map alone.
                    let down: Vec<String> = match connection.json {
                        true => Vec::new(),
                        false => connection
                            .status()?
                            .servers
                            .into_iter()
                            .filter(|s| !s.up)
                            .map(|s| s.name)
                            .collect(),
                    };
                    connection.print(&map, || print_layout(&map, &down))
                }
                other => bail!("unexpected reply {other:?}"),
            }
        }
        VolumeCommand::Partition {
            name,
            pages: (first_page, end_page),
            servers,
        } => {
            let what = format!(
                "pages {first_page}..{end_page} of {name} now on {}",
                servers.join(", ")
            );
            connection.applied(
                AdminCommand::SetPartition {
                    volume: name,
                    first_page,
                    end_page,
                    servers,
                },
                &what,
            )
        }
        VolumeCommand::Resize { name, size } => {
            let what = format!("resized volume {name} to {size}");
            connection.applied(AdminCommand::ResizeVolume { name, size: size.0 }, &what)
        }
        VolumeCommand::Verify { name, region } => {
            crate::mirror_cmd::verify(connection, &name, region)
        }
        VolumeCommand::Delete { name, yes } => {
            confirm(&format!("delete volume {name} and all its data"), yes)?;
            let what = format!("deleted volume {name}");
            connection.applied(AdminCommand::DeleteVolume { name }, &what)
        }
    }
}

pub fn server(connection: &Connection, command: ServerCommand) -> anyhow::Result<()> {
    match command {
        ServerCommand::List => {
            let status = connection.status()?;
            connection.print(&status.servers, || print_servers(&status))
        }
        ServerCommand::Remove { name, force, yes } => {
            if force {
                confirm(
                    &format!("remove server {name} and mark the partitions it holds lost"),
                    yes,
                )?;
            }
            let what = format!("removed server {name}");
            connection.applied(AdminCommand::RemoveServer { name, force }, &what)
        }
    }
}

fn print_servers(status: &ClusterStatus) {
    println!(
        "{:<16} {:<22} {:>10} {:<5} HELD EPOCHS",
        "SERVER", "ADDRESS", "CAPACITY", "STATE"
    );
    for s in &status.servers {
        let held: Vec<String> = s
            .held
            .iter()
            .map(|(v, e)| format!("{}@{}", v.0, e.0))
            .collect();
        println!(
            "{:<16} {:<22} {:>10} {:<5} {}",
            s.name,
            s.addr.to_string(),
            ByteSize(s.capacity).to_string(),
            if s.up { "up" } else { "down" },
            held.join(" ")
        );
    }
}

pub fn status(connection: &Connection) -> anyhow::Result<()> {
    let status = connection.status()?;
    // The table shows the monitor's judgement too; the JSON is the map alone.
    let monitored = match connection.json {
        true => Vec::new(),
        false => connection.mirror_status()?,
    };
    connection.print(&status, || {
        println!("cluster epoch {}", status.epoch.0);
        println!();
        print_servers(&status);
        println!();
        print_volume_header();
        status.volumes.iter().for_each(print_volume_line);
        let mirrors: Vec<_> = status
            .volumes
            .iter()
            .flat_map(|v| crate::mirror_cmd::rows(&monitored, &v.name))
            .collect();
        if !mirrors.is_empty() {
            println!();
            crate::mirror_cmd::print_rows(&mirrors);
        }
    })
}
