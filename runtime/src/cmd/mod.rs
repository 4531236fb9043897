//! One module per subcommand.

pub mod bench;
pub mod demo;
pub mod doctor;
pub mod overhead;
pub mod selftest;
