//! The `kestrel` command line (see `kestrel --help`); the logic lives in
//! [`kestrel::cli`].

fn main() {
    std::process::exit(kestrel::cli::main());
}
