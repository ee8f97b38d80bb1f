//! Running one external command: echo it, run it from the workspace root, and
//! turn a non-zero exit into an error message that names the command.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::{env, fmt};

/// The workspace root. xtask lives in `<root>/xtask`, so it is the parent of
/// this crate's manifest directory; baked in at compile time so the commands
/// run from the root whatever the caller's working directory is.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
        .to_path_buf()
}

/// A command to run, built up like `std::process::Command` but printable as
/// the shell line a person would type.
pub(crate) struct Cmd {
    /// What is executed: `$CARGO` when cargo runs us, so the same toolchain
    /// is used throughout.
    program: OsString,
    /// What is printed in its place (`cargo`, not a toolchain path).
    display: String,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Cmd {
    /// `$CARGO`, falling back to `cargo` on the `PATH`.
    pub(crate) fn cargo() -> Cmd {
        Cmd {
            program: env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            display: "cargo".to_owned(),
            args: Vec::new(),
            envs: Vec::new(),
        }
    }

    pub(crate) fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.args
            .extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    pub(crate) fn env(mut self, key: &str, value: &str) -> Cmd {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(workspace_root());
        command
    }

    /// Prints `$ <command>` and runs it with inherited stdio.
    ///
    /// # Errors
    ///
    /// If the command cannot be started or exits unsuccessfully.
    pub(crate) fn run(&self) -> Result<(), String> {
        eprintln!("$ {self}");
        let status = self
            .command()
            .status()
            .map_err(|err| format!("could not start `{self}`: {err}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("`{self}` failed ({status})"))
        }
    }

    /// Runs the command without echoing it and returns the first line of its
    /// stdout, or `None` if it could not run or failed. For probes such as
    /// `cargo deny --version`, where failure is an answer, not an error.
    pub(crate) fn probe(&self) -> Option<String> {
        let output = self
            .command()
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        Some(stdout.lines().next().unwrap_or_default().trim().to_owned())
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (key, value) in &self.envs {
            write!(f, "{key}={} ", quote(value))?;
        }
        f.write_str(&self.display)?;
        for arg in &self.args {
            write!(f, " {}", quote(arg))?;
        }
        Ok(())
    }
}

/// Single-quotes `s` if a shell would otherwise split or expand it, so the
/// echoed line can be pasted back into a terminal.
fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,@+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_quotes_only_what_needs_it() {
        let cmd = Cmd::cargo().env("RUSTDOCFLAGS", "-D warnings").args([
            "doc",
            "--workspace",
            "--no-deps",
        ]);
        assert_eq!(
            cmd.to_string(),
            "RUSTDOCFLAGS='-D warnings' cargo doc --workspace --no-deps"
        );
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }
}
