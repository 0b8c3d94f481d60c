//! Temporary stand-alone driver for the aarch64-paging peer benchmarks: runs
//! the sanity check, then times each peer operation a few times with
//! `Instant` and prints ns per 4 KiB page (min and median of the runs).

#[path = "peer_aarch64_paging.rs"]
mod peer;

use std::time::Duration;

type PeerFn = fn(u64) -> Duration;

fn main() {
    peer::sanity();
    println!("peer sanity: ok");
    let runs: usize = std::env::var("PEER_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let ops: [(&str, PeerFn); 8] = [
        ("map 1 GiB 4K, one call", peer::peer_map_1g_4k),
        ("map 4K, one call per page", peer::peer_map_4k_per_call),
        ("map 1 GiB as 2M blocks", peer::peer_map_1g_2m),
        ("unmap 1 GiB of 4K (clear valid)", peer::peer_unmap_1g_4k),
        (
            "unmap 1 GiB of 4K (map invalid, frees)",
            peer::peer_unmap_free_1g_4k,
        ),
        ("wrprotect 1 GiB of 4K", peer::peer_wrprotect_1g_4k),
        (
            "split 2M -> 4K (modify_range/block)",
            peer::peer_split_1g_2m,
        ),
        (
            "split 2M -> 4K (one remap call)",
            peer::peer_split_remap_1g_2m,
        ),
    ];
    println!(
        "{:<42} {:>10} {:>10}",
        "operation (aarch64-paging 0.12)", "min ns/pg", "med ns/pg"
    );
    for (name, f) in ops {
        let mut v: Vec<f64> = (0..runs)
            .map(|_| f(1).as_nanos() as f64 / peer::PAGES as f64)
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        println!("{:<42} {:>10.2} {:>10.2}", name, v[0], v[v.len() / 2]);
    }
    println!(
        "{:<42} {:>10} {:>10}",
        "relax_perms, per call", "n/a", "n/a"
    );
    println!(
        "{:<42} {:>10} {:>10}",
        "test_clear_young 1 GiB", "n/a", "n/a"
    );
}
