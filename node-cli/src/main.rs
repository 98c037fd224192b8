//! `p2p-node`: the command line over the library (the `cli` feature, `src/entry.rs`).

fn main() -> std::process::ExitCode {
    node_cli::__cli_main()
}
