//! Debian packages for the tasks that need them: `apt-get` as root, or through `sudo`.

use std::process::Command;

use anyhow::Result;

use crate::run;

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `cmd`, through `sudo` unless this process is root.
pub(crate) fn privileged(cmd: &str) -> Command {
    if is_root() {
        Command::new(cmd)
    } else {
        let mut c = Command::new("sudo");
        c.arg(cmd);
        c
    }
}

/// `apt-get <args>`, privileged and non-interactive.
pub(crate) fn apt_get(args: &[&str]) -> Result<()> {
    let mut c = privileged("apt-get");
    c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    run(&format!("apt-get {}", args.join(" ")), c)
}
