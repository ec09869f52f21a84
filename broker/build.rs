//! Records the git commit roost is built from, for `roost --version`.
//!
//! `ROOST_GIT_COMMIT` in the environment wins (a packager building from a tarball sets
//! it); else `git rev-parse` asks the repository the crate sits in; without git or a
//! repository the commit is `unknown`, and the build goes on.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ROOST_GIT_COMMIT");
    let commit = match std::env::var("ROOST_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => {
            // Build again when HEAD moves: HEAD itself, and the branch it points to (a
            // loose ref, or packed-refs). Only files that exist: cargo takes a missing
            // one for a change and would rebuild the broker every time.
            for path in [
                git(&["rev-parse", "--git-path", "HEAD"]),
                git(&["symbolic-ref", "-q", "HEAD"])
                    .and_then(|r| git(&["rev-parse", "--git-path", &r])),
                git(&["rev-parse", "--git-path", "packed-refs"]),
            ]
            .into_iter()
            .flatten()
            .filter(|p| std::path::Path::new(p).exists())
            {
                println!("cargo:rerun-if-changed={path}");
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=ROOST_GIT_COMMIT={commit}");
}
