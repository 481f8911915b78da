//! CPU time of this process and of other processes on the machine, from
//! `/proc/PID/stat` (user + system time).

/// CPU seconds used so far by this process and by `pids` (a process that
/// cannot be read counts 0).
pub fn seconds(pids: &[u32]) -> f64 {
    let ticks = clock_ticks();
    let own = process_ticks("self").unwrap_or(0);
    let others: u64 = pids
        .iter()
        .filter_map(|pid| process_ticks(&pid.to_string()))
        .sum();
    (own + others) as f64 / ticks
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks.
fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_ticks(&stat)
}

/// Fields 14 and 15 (utime, stime), counted after the command name, which
/// is in parentheses and may hold spaces.
fn parse_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_spaces_in_the_name() {
        let line = "4242 (tessera storage) S 1 4242 4242 0 -1 4194560 1200 0 0 0 731 94 0 0 20 0 3 0 100 0";
        assert_eq!(parse_ticks(line), Some(825));
        assert_eq!(parse_ticks("garbage"), None);
    }

    #[test]
    fn reads_this_process_and_skips_missing_ones() {
        assert!(process_ticks("self").is_some());
        assert_eq!(process_ticks("4294967295"), None);
    }
}
