//! Records, at build time, the commit the binaries are built from
//! (`KESTREL_BUILD_COMMIT`, read by `kestrel::run::git_commit`), so that a
//! run's `result.json` names the code that computed it. Asking git at run
//! time instead named whatever the source checkout held *then*: a binary
//! built at one commit and run while the checkout had moved on (as the
//! CIFAR runs that span sittings do) recorded the later commit.
//!
//! `$KESTREL_GIT_COMMIT`, when set, is taken as it is (a build outside any
//! checkout can still say what it is).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=KESTREL_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(c) = std::env::var("KESTREL_GIT_COMMIT") {
        println!("cargo:rustc-env=KESTREL_BUILD_COMMIT={c}");
        return;
    }
    // Run again when the commit moves (HEAD, the branch refs, the index
    // that every commit and checkout rewrites) or the code changes (the
    // "-dirty" mark). Paths from git itself, so that worktrees, whose
    // `.git` is a file, work too.
    // (Only paths that exist: Cargo runs a script that names a missing
    // one on every build, which would rebuild the crate every time.)
    let mut watch: Vec<String> = ["src", "kernels", "emu", "Cargo.toml", "Cargo.lock"]
        .map(String::from)
        .to_vec();
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        watch.extend(["HEAD", "index"].map(|f| format!("{dir}/{f}")));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        watch.extend(["refs/heads", "packed-refs"].map(|f| format!("{common}/{f}")));
    }
    for p in watch.iter().filter(|p| std::path::Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={p}");
    }
    let Some(head) = git(&["rev-parse", "HEAD"]) else {
        return; // not a checkout: the binaries name no commit
    };
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
    let commit = if dirty { format!("{head}-dirty") } else { head };
    println!("cargo:rustc-env=KESTREL_BUILD_COMMIT={commit}");
}
