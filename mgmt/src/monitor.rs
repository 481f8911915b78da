//! The monitor: each mirror's state joined with its primary's latest
//! bitmask report, giving what may differ and how far a resync has come.
//! Pure, and made here once: `tessera status` and `tessera mirror status`
//! render it (and the management server's metrics will, with issue 19).

use std::collections::HashMap;
use std::time::Duration;

use tessera_proto::{MirrorReport, MirrorState, MirrorStatus, VolumeMap};

/// What the management server knows of a storage server's life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Liveness {
    pub up: bool,
    /// Since its last request, if any reached this management process.
    pub heard: Option<Duration>,
}

/// Every mirror of every partition of `volumes`, judged from `reports`
/// (the primaries' latest; a report from any other server is ignored) and
/// the servers' `liveness`.
pub fn mirror_status(
    volumes: &[VolumeMap],
    reports: &[MirrorReport],
    liveness: &HashMap<String, Liveness>,
) -> Vec<MirrorStatus> {
    let life = |server: &str| liveness.get(server).copied().unwrap_or_default();
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut out = Vec::new();
    for volume in volumes {
        for p in &volume.partitions {
            let Some(primary) = p.replicas.first() else {
                continue;
            };
            for r in p.replicas.iter().skip(1) {
                let report = reports.iter().find(|m| {
                    m.reporter == primary.server
                        && m.volume == volume.id
                        && m.first_page == p.first_page
                        && m.peer == r.server
                });
                let region = report.map_or(0, |m| u64::from(m.region_size));
                // A mirror in sync lacks nothing: bits still set there only
                // wait for the cleaner.
                let differing = match (r.state, report) {
                    (MirrorState::InSync, _) | (_, None) => 0,
                    (_, Some(m)) => m.dirty_regions,
                };
                let resync = report.and_then(|m| m.resync.as_ref());
                let (total, copied, rate) = resync.map_or((0, 0, 0), |r| {
                    (r.total_regions, r.copied_regions, r.bytes_per_sec)
                });
                let eta_secs = (r.state == MirrorState::Resyncing && rate > 0)
                    .then(|| total.saturating_sub(copied).saturating_mul(region) / rate);
                out.push(MirrorStatus {
                    volume: volume.name.clone(),
                    first_page: p.first_page,
                    end_page: p.end_page,
                    primary: primary.server.clone(),
                    mirror: r.server.clone(),
                    state: r.state,
                    differing_regions: differing,
                    differing_bytes: differing.saturating_mul(region),
                    resync_total_regions: total,
                    resync_copied_regions: copied,
                    resync_bytes_per_sec: rate,
                    eta_secs,
                    primary_up: life(&primary.server).up,
                    mirror_up: life(&r.server).up,
                    primary_heard_ms: life(&primary.server).heard.map(ms),
                    mirror_heard_ms: life(&r.server).heard.map(ms),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tessera_proto::{Epoch, Partition, Replica, ResyncProgress, VolumeId};

    use super::*;

    fn replica(server: &str, state: MirrorState) -> Replica {
        Replica {
            server: server.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            state,
        }
    }

    fn volume(mirror: MirrorState) -> VolumeMap {
        VolumeMap {
            id: VolumeId(7),
            name: "v".into(),
            epoch: Epoch(3),
            size: 1 << 30,
            page_size: 1 << 20,
            partitions: vec![
                Partition {
                    first_page: 0,
                    end_page: 512,
                    replicas: vec![replica("s1", MirrorState::InSync), replica("s2", mirror)],
                },
                Partition {
                    first_page: 512,
                    end_page: 1024,
                    replicas: vec![replica("s2", MirrorState::InSync)],
                },
            ],
        }
    }

    fn alive() -> HashMap<String, Liveness> {
        let up = Liveness {
            up: true,
            heard: Some(Duration::from_millis(300)),
        };
        [("s1".to_string(), up), ("s2".to_string(), up)].into()
    }

    fn report(reporter: &str, dirty: u64, resync: Option<ResyncProgress>) -> MirrorReport {
        MirrorReport {
            reporter: reporter.into(),
            volume: VolumeId(7),
            first_page: 0,
            peer: "s2".into(),
            dirty_regions: dirty,
            region_size: 64 << 10,
            resync,
        }
    }

    #[test]
    fn an_out_of_sync_mirror_may_differ_by_its_primarys_bits() {
        let rows = mirror_status(
            &[volume(MirrorState::OutOfSync)],
            &[report("s1", 10, None)],
            &alive(),
        );
        assert_eq!(rows.len(), 1, "only the partition with a mirror");
        let row = &rows[0];
        assert_eq!((row.primary.as_str(), row.mirror.as_str()), ("s1", "s2"));
        assert_eq!((row.first_page, row.end_page), (0, 512));
        assert_eq!(row.state, MirrorState::OutOfSync);
        assert_eq!(row.differing_regions, 10);
        assert_eq!(row.differing_bytes, 10 * (64 << 10));
        assert_eq!(row.eta_secs, None);
    }

    #[test]
    fn a_mirror_in_sync_differs_by_nothing_whatever_bits_wait_for_the_cleaner() {
        let rows = mirror_status(
            &[volume(MirrorState::InSync)],
            &[report("s1", 10, None)],
            &alive(),
        );
        assert_eq!((rows[0].differing_regions, rows[0].differing_bytes), (0, 0));
    }

    #[test]
    fn a_resync_shows_progress_and_an_eta_at_its_rate() {
        let progress = ResyncProgress {
            total_regions: 100,
            copied_regions: 40,
            bytes_per_sec: 64 << 10,
        };
        let rows = mirror_status(
            &[volume(MirrorState::Resyncing)],
            &[report("s1", 60, Some(progress))],
            &alive(),
        );
        let row = &rows[0];
        assert_eq!(
            (row.resync_total_regions, row.resync_copied_regions),
            (100, 40)
        );
        assert_eq!(row.resync_bytes_per_sec, 64 << 10);
        assert_eq!(
            row.eta_secs,
            Some(60),
            "60 regions left at one region a second"
        );
    }

    #[test]
    fn each_row_says_whether_its_servers_are_up_and_when_they_were_heard() {
        let mut liveness = alive();
        liveness.insert(
            "s2".into(),
            Liveness {
                up: false,
                heard: Some(Duration::from_secs(7)),
            },
        );
        let rows = mirror_status(&[volume(MirrorState::OutOfSync)], &[], &liveness);
        assert!(rows[0].primary_up && !rows[0].mirror_up);
        assert_eq!(rows[0].primary_heard_ms, Some(300));
        assert_eq!(rows[0].mirror_heard_ms, Some(7000));
        let unknown = mirror_status(&[volume(MirrorState::InSync)], &[], &HashMap::new());
        assert!(!unknown[0].mirror_up && unknown[0].mirror_heard_ms.is_none());
    }

    #[test]
    fn only_the_primarys_report_counts() {
        // A report by the mirror itself (say, from before a failover) is not the primary's view.
        let rows = mirror_status(
            &[volume(MirrorState::OutOfSync)],
            &[report("s2", 10, None)],
            &alive(),
        );
        assert_eq!(rows[0].differing_regions, 0);
        assert_eq!(rows[0].differing_bytes, 0);
    }
}
