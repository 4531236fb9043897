//! One module per subcommand.

pub mod adam_bench;
pub mod allreduce_bench;
pub mod bench;
pub mod checkpoint_bench;
pub mod checkpoint_overhead;
pub mod demo;
pub mod doctor;
pub mod handshake_bench;
pub mod hetero;
pub mod launch;
pub mod overhead;
pub mod pinned;
pub mod plan;
pub mod report;
pub mod sharded_bench;
