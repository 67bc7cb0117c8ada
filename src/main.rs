//! `previrt`: the command-line front end. Each subcommand lives in the crate that does the work;
//! this file only parses arguments and dispatches.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "previrt", version, about = "Pre-virtualize x86-64 kernels automatically, and run them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {}

fn main() {
    let _cli = Cli::parse();
}
