//! Running external commands with errors that name the command that failed.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// The command line as a person would type it, for messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            parts.push(format!("'{}'", arg.replace('\'', r"'\''")));
        } else {
            parts.push(arg.into_owned());
        }
    }
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; a non-zero exit is an error naming the command.
/// `hint` is appended to the error (say what the likely cause is), if not empty.
pub fn run(cmd: &mut Command, hint: &str) -> Result<()> {
    let shown = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        if hint.is_empty() {
            bail!("`{shown}` failed ({status})");
        }
        bail!("`{shown}` failed ({status}); {hint}");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout (trimmed); stderr is shown in the error on failure.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs one named step of a task, printing its command and how long it took.
pub fn step(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    println!("==> {shown}");
    let start = Instant::now();
    let result = run(cmd, "");
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            println!("<== ok in {secs:.1}s: {shown}");
            Ok(())
        }
        Err(e) => Err(e.context(format!("step failed after {secs:.1}s: `{shown}`"))),
    }
}
