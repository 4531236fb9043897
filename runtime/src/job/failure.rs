//! A job's error, said once.
//!
//! Under `mpirun` every rank that meets bad input (a missing data file, say) fails the same way
//! before the ranks connect, and each would print the same message. Under `ballast launch`
//! (which sets [`ballast_collectives::env::REPORT_DIR`]), rank 0 prints its error and every
//! rank leaves its own in `error-<rank>.txt` there; the supervisor then prints only the
//! messages rank 0's does not already say (all of them when the launcher ended rank 0 before it
//! failed on its own). A job started without the supervisor prints on every rank, as before.

use std::path::Path;

use ballast_cluster::Launch;

/// The start of an error file's name in the report directory.
const PREFIX: &str = "error-";

/// Says the job's error, `<program>: error: <message>`, on stderr, or, for a rank other than 0
/// under `ballast launch` with bad input (`code` 2), in the report directory, where the
/// supervisor compares it with rank 0's. Errors that differ by rank (a lost peer, exit 75) are
/// printed by every rank.
pub fn say_error(program: &str, message: &str, code: u8) {
    let line = format!("{program}: error: {message}");
    let rank = Launch::from_env().ok().filter(Launch::is_launched).map(|l| l.rank);
    let dir = std::env::var_os(ballast_collectives::env::REPORT_DIR);
    let (Some(rank), Some(dir), 2) = (rank, dir, code) else {
        eprintln!("{line}");
        return;
    };
    // Rank 0 prints first: the launcher may end it as soon as another rank exits, and then the
    // file it did not write leaves the supervisor to print the others' message.
    if rank == 0 {
        eprintln!("{line}");
    }
    let written = std::fs::write(Path::new(&dir).join(format!("{PREFIX}{rank}.txt")), &line);
    if rank != 0 && written.is_err() {
        eprintln!("{line}");
    }
}

/// The errors ranks left in `dir`, by rank, that rank 0's does not already say: each distinct
/// message once, with the ranks that gave it.
pub fn errors_beyond_rank_zero(dir: &Path) -> Vec<(Vec<usize>, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut by_rank: Vec<(usize, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rank = name.strip_prefix(PREFIX)?.strip_suffix(".txt")?.parse().ok()?;
            Some((rank, std::fs::read_to_string(e.path()).ok()?))
        })
        .collect();
    by_rank.sort();
    let zero = by_rank.iter().find(|(r, _)| *r == 0).map(|(_, m)| m.clone());
    let mut distinct: Vec<(Vec<usize>, String)> = Vec::new();
    for (rank, message) in by_rank {
        if Some(&message) == zero.as_ref() {
            continue;
        }
        match distinct.iter_mut().find(|(_, m)| *m == message) {
            Some((ranks, _)) => ranks.push(rank),
            None => distinct.push((vec![rank], message)),
        }
    }
    distinct
}

/// Whether `name` is an error file's, not a loss report's.
pub fn is_error_file(name: &str) -> bool {
    name.starts_with(PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_messages_rank_zero_does_not_say_are_left() {
        let dir = tempfile::tempdir().unwrap();
        let put = |rank: usize, m: &str| std::fs::write(dir.path().join(format!("error-{rank}.txt")), m).unwrap();
        put(0, "job: error: no file x");
        put(1, "job: error: no file x");
        put(2, "job: error: rank 2: no device");
        put(3, "job: error: rank 2: no device");
        std::fs::write(dir.path().join("rank-1.json"), "{}").unwrap();
        assert_eq!(
            errors_beyond_rank_zero(dir.path()),
            vec![(vec![2, 3], "job: error: rank 2: no device".to_string())]
        );
        std::fs::remove_file(dir.path().join("error-0.txt")).unwrap();
        assert_eq!(errors_beyond_rank_zero(dir.path()).len(), 2);
        assert!(is_error_file("error-1.txt") && !is_error_file("rank-1.json"));
    }
}
