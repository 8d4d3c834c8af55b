//! `kvstore-dist`'s `dist_bench` (one worker of the dist benchmark) with this crate linked, so
//! that `--store pslite_dist_sync` times this crate's worker against MXNet 1.9.1's scheduler
//! and servers. `kvstore-dist/scripts/compare_mxnet_dist.py --pslite` starts such a job beside
//! the all-MXNet and all-Rust ones. The dense workloads apply (`--only push_pull --only
//! small_keys --only init`), and, with `--optimizer sgd`, sgd on MXNet's servers (sent as the
//! pickle MXNet builds its optimizer from).
#[path = "../../kvstore-dist/examples/dist_bench.rs"]
mod dist_bench;

use kvstore_pslite as _;

fn main() -> std::process::ExitCode {
    dist_bench::main()
}
