//! `tessera mirror status|wait` and `tessera volume verify`: the monitor's
//! view of mirrors, and a region-by-region comparison of replicas.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tessera_net::proto::{
    MAX_CHECKSUM_REGIONS, MgmtReply, MgmtRequest, MirrorState, MirrorStatus, Role,
};
use tessera_net::quic::{Alpn, Endpoint, TransportTuning};
use tessera_net::units::ByteSize;

use crate::admin::Connection;

#[derive(Debug, Subcommand)]
pub enum MirrorCommand {
    /// Each mirror of a volume: in sync; out of sync, with the regions and
    /// bytes that may differ; or resyncing, with progress, rate and ETA.
    Status { volume: String },
    /// Wait, with a progress bar, until every mirror of a volume is in sync.
    Wait {
        volume: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
}

/// One mirror of one partition, as `mirror status` shows it (the
/// monitor's judgement, with the state spelled out).
#[derive(Debug, Clone, Serialize)]
pub struct MirrorRow {
    pub volume: String,
    pub first_page: u64,
    pub end_page: u64,
    pub primary: String,
    pub mirror: String,
    /// "in sync", "out of sync" or "resyncing".
    pub state: &'static str,
    /// Regions (and bytes) the mirror may lack, per the primary's bitmask.
    pub differing_regions: u64,
    pub differing_bytes: u64,
    pub resync_total_regions: u64,
    pub resync_copied_regions: u64,
    pub resync_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub primary_up: bool,
    pub mirror_up: bool,
    /// Milliseconds since the management server last heard from each server.
    pub primary_heard_ms: Option<u64>,
    pub mirror_heard_ms: Option<u64>,
}

/// How a replica's state reads in tables and JSON.
pub fn state_name(state: MirrorState) -> &'static str {
    match state {
        MirrorState::InSync => "in sync",
        MirrorState::OutOfSync => "out of sync",
        MirrorState::Resyncing => "resyncing",
    }
}

/// The mirrors of `volume` as the management server's monitor judged them.
pub fn rows(mirrors: &[MirrorStatus], volume: &str) -> Vec<MirrorRow> {
    mirrors
        .iter()
        .filter(|m| m.volume == volume)
        .map(|m| MirrorRow {
            volume: m.volume.clone(),
            first_page: m.first_page,
            end_page: m.end_page,
            primary: m.primary.clone(),
            mirror: m.mirror.clone(),
            state: state_name(m.state),
            differing_regions: m.differing_regions,
            differing_bytes: m.differing_bytes,
            resync_total_regions: m.resync_total_regions,
            resync_copied_regions: m.resync_copied_regions,
            resync_bytes_per_sec: m.resync_bytes_per_sec,
            eta_secs: m.eta_secs,
            primary_up: m.primary_up,
            mirror_up: m.mirror_up,
            primary_heard_ms: m.primary_heard_ms,
            mirror_heard_ms: m.mirror_heard_ms,
        })
        .collect()
}

pub fn print_rows(rows: &[MirrorRow]) {
    println!(
        "{:<16} {:>17} {:<14} {:<14} {:<12} DETAIL",
        "VOLUME", "PAGES", "PRIMARY", "MIRROR", "STATE"
    );
    for r in rows {
        println!(
            "{:<16} {:>17} {:<14} {:<14} {:<12} {}",
            r.volume,
            format!("{}..{}", r.first_page, r.end_page),
            r.primary,
            r.mirror,
            r.state,
            detail(r)
        );
    }
}

/// What a row's state means now: what may differ, how far a resync is,
/// what it waits for, and which server is down.
fn detail(r: &MirrorRow) -> String {
    let state = match r.state {
        "out of sync" => format!(
            "{} regions ({}) may differ",
            r.differing_regions,
            ByteSize(r.differing_bytes)
        ),
        "resyncing" if r.resync_total_regions > 0 => format!(
            "{:.0}% of {} regions, {}/s, ETA {}",
            100.0 * r.resync_copied_regions as f64 / r.resync_total_regions as f64,
            r.resync_total_regions,
            ByteSize(r.resync_bytes_per_sec),
            r.eta_secs
                .map_or_else(|| "-".to_string(), |s| format!("{s} s"))
        ),
        "resyncing" => format!(
            "starting: waiting for {} to report its first copy",
            r.primary
        ),
        _ => String::new(),
    };
    let down: Vec<&str> = [(r.primary_up, &r.primary), (r.mirror_up, &r.mirror)]
        .into_iter()
        .filter(|(up, _)| !up)
        .map(|(_, name)| name.as_str())
        .collect();
    match (down.is_empty(), state.is_empty()) {
        (true, _) => state,
        (false, true) => format!("{} down", down.join(", ")),
        (false, false) => format!("{state}; {} down", down.join(", ")),
    }
}

fn volume_rows(connection: &Connection, volume: &str) -> anyhow::Result<Vec<MirrorRow>> {
    let status = connection.status()?;
    if !status.volumes.iter().any(|v| v.name == volume) {
        bail!("no volume {volume:?}");
    }
    Ok(rows(&connection.mirror_status()?, volume))
}

pub fn run(connection: &Connection, command: MirrorCommand) -> anyhow::Result<()> {
    match command {
        MirrorCommand::Status { volume } => {
            let rows = volume_rows(connection, &volume)?;
            connection.print(&rows, || {
                if rows.is_empty() {
                    println!("volume {volume} has no mirrors (one replica)");
                } else {
                    print_rows(&rows);
                }
            })
        }
        MirrorCommand::Wait { volume, timeout } => wait(connection, &volume, timeout),
    }
}

/// Whether `row` is settled: in sync, both servers up, and both heard from
/// since `waited` began, so a server restarted just before the wait (whose
/// old process the management server still counts) is not taken for in
/// sync until its new process has registered and its resync is done.
fn settled(row: &MirrorRow, waited: Duration) -> bool {
    let heard = |ms: Option<u64>| ms.is_some_and(|ms| Duration::from_millis(ms) < waited);
    row.state == "in sync"
        && row.primary_up
        && row.mirror_up
        && heard(row.primary_heard_ms)
        && heard(row.mirror_heard_ms)
}

fn wait(connection: &Connection, volume: &str, timeout: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout);
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} resync {bar:40} {pos}/{len} regions {msg} [{elapsed_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let rows = volume_rows(connection, volume)?;
        let pending: Vec<&MirrorRow> = rows
            .iter()
            .filter(|r| !settled(r, started.elapsed()))
            .collect();
        if pending.is_empty() {
            bar.finish_and_clear();
            let done = serde_json::json!({ "volume": volume, "in_sync": rows.len() });
            return connection.print(&done, || {
                println!(
                    "every mirror of {volume} is in sync ({} mirrors)",
                    rows.len()
                )
            });
        }
        if Instant::now() > deadline {
            bar.abandon();
            print_rows(&rows);
            bail!("mirrors of {volume} still not in sync after {timeout} s");
        }
        let total: u64 = pending.iter().map(|r| r.resync_total_regions).sum();
        let copied: u64 = pending.iter().map(|r| r.resync_copied_regions).sum();
        let rate: u64 = pending.iter().map(|r| r.resync_bytes_per_sec).sum();
        let count = |state: &str| pending.iter().filter(|r| r.state == state).count();
        let unsure = count("in sync");
        bar.set_length(total);
        bar.set_position(copied);
        bar.set_message(format!(
            "{}/s, {} resyncing, {} out of sync, {unsure} in sync awaiting a heartbeat",
            ByteSize(rate),
            count("resyncing"),
            count("out of sync"),
        ));
        bar.tick();
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A difference found by `volume verify`.
#[derive(Debug, Serialize)]
struct Difference {
    offset: u64,
    length: u64,
    /// Each replica's checksum of the region.
    sums: Vec<(String, u32)>,
}

pub fn verify(connection: &Connection, name: &str, region: ByteSize) -> anyhow::Result<()> {
    let region_size = u32::try_from(region.0)
        .ok()
        .filter(|r| r.is_power_of_two() && *r >= 4096)
        .context("--region must be a power of two of at least 4K")?;
    let map = match connection.call(MgmtRequest::GetMap {
        volume: name.to_string(),
    })? {
        MgmtReply::Map(map) => map,
        other => bail!("unexpected reply {other:?}"),
    };
    let identity = connection.identity()?;
    let mgmt = connection.mgmt_addr();
    let (differences, regions, replicas) = crate::runtime::current_thread()?.block_on(async {
        let endpoint = Endpoint::client(mgmt, &identity, &TransportTuning::default())?;
        let mut differences = Vec::new();
        let mut regions = 0u64;
        let mut replicas = 0usize;
        let page = u64::from(map.page_size);
        let region = u64::from(region_size);
        for p in &map.partitions {
            replicas = replicas.max(p.replicas.len());
            let start = p.first_page * page;
            let end = (p.end_page * page).min(map.size);
            let mut at = start;
            while at < end {
                let length = (end - at).min(region * MAX_CHECKSUM_REGIONS);
                let mut all = Vec::new();
                for r in &p.replicas {
                    let conn = endpoint
                        .connect(r.addr, &r.server, Alpn::Mgmt, Role::Storage)
                        .await
                        .with_context(|| format!("cannot reach {} at {}", r.server, r.addr))?;
                    let request = MgmtRequest::RegionChecksums {
                        volume: map.id,
                        offset: at,
                        length,
                        region_size,
                    };
                    match conn.mgmt(&request).await? {
                        MgmtReply::Checksums { sums } => all.push((r.server.clone(), sums)),
                        other => bail!("{} answered {other:?}", r.server),
                    }
                    conn.close();
                }
                let count = length.div_ceil(region) as usize;
                for i in 0..count {
                    let sums: Vec<(String, u32)> = all
                        .iter()
                        .map(|(s, sums)| (s.clone(), sums.get(i).copied().unwrap_or_default()))
                        .collect();
                    if sums.windows(2).any(|w| w[0].1 != w[1].1) {
                        let offset = at + i as u64 * region;
                        differences.push(Difference {
                            offset,
                            length: region.min(end - offset),
                            sums,
                        });
                    }
                }
                regions += count as u64;
                at += length;
            }
        }
        endpoint.close();
        Ok::<_, anyhow::Error>((differences, regions, replicas))
    })?;
    let report = serde_json::json!({
        "volume": name,
        "regions": regions,
        "region_size": region_size,
        "replicas": replicas,
        "differences": differences,
    });
    connection.print(&report, || {
        for d in &differences {
            let sums: Vec<String> = d.sums.iter().map(|(s, c)| format!("{s}={c:08x}")).collect();
            println!(
                "differs at {} (+{}): {}",
                d.offset,
                ByteSize(d.length),
                sums.join(" ")
            );
        }
        println!(
            "{name}: {regions} regions of {} on up to {replicas} replicas, {} differ",
            ByteSize(u64::from(region_size)),
            differences.len()
        );
    })?;
    if !differences.is_empty() {
        bail!(
            "{} regions of {name} differ between replicas",
            differences.len()
        );
    }
    Ok(())
}
