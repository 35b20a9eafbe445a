//! What a binary accepts, read from its clap `--help` output: long flags (switch or taking a
//! value), their `[env: …]` names and `[default: …]` values, and whether it takes positional
//! arguments or subcommands.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// One long option of a binary.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagSpec {
    /// `--flag <VALUE>` (or `--flag [<VALUE>]`) rather than a bare switch.
    pub takes_value: bool,
    /// The env var clap reads it from, `[env: NAME=…]`.
    pub env: Option<String>,
    /// `[default: …]`, the value the binary uses when neither flag nor env var is given.
    pub default: Option<String>,
}

/// The command-line interface of one binary.
#[derive(Debug, Clone, PartialEq)]
pub struct BinaryHelp {
    /// Long flags with their leading `--`, e.g. `--listen`.
    pub flags: BTreeMap<String, FlagSpec>,
    /// The help has an `Arguments:` or `Commands:` section.
    pub takes_positionals: bool,
}

impl BinaryHelp {
    /// Runs `binary --help` with no `FMBOOST_*` variables in its environment (clap prints an
    /// env var's current value in the help) and parses the output.
    pub fn of_binary(binary: &Path) -> Result<Self, String> {
        let mut command = Command::new(binary);
        command.arg("--help");
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("FMBOOST_") {
                command.env_remove(name);
            }
        }
        let out = command.output().map_err(|e| format!("{}: cannot run --help: {e}", binary.display()))?;
        if !out.status.success() {
            return Err(format!("{} --help failed ({}): {}", binary.display(), out.status, String::from_utf8_lossy(&out.stderr)));
        }
        let text = String::from_utf8(out.stdout).map_err(|e| format!("{} --help: not UTF-8: {e}", binary.display()))?;
        Self::parse(&text).map_err(|e| format!("{} --help: {e}", binary.display()))
    }

    /// Parses clap 4's help layout, short (`-h`: description on the flag's line) or long
    /// (`--help`: description below it). Option lines are indented at most 6 spaces (`  -h,
    /// --help`, `      --listen <LISTEN>`); descriptions deeper, so a description that
    /// mentions `--flag` is not taken for one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut flags = BTreeMap::new();
        let mut takes_positionals = false;
        let mut section = "";
        let mut current: Option<String> = None;
        for line in text.lines() {
            if !line.starts_with(' ') && line.ends_with(':') {
                section = line;
                takes_positionals |= section == "Arguments:" || section == "Commands:";
                current = None;
                continue;
            }
            if section != "Options:" {
                continue;
            }
            if let Some((name, spec)) = option_line(line) {
                if flags.insert(name.clone(), spec).is_some() {
                    return Err(format!("flag {name} listed twice"));
                }
                current = Some(name);
            }
            // `[env: …]` and `[default: …]` belong to the option whose block this line is in.
            if let Some(spec) = current.as_ref().and_then(|name| flags.get_mut(name)) {
                if let Some(env) = bracketed(line, "[env: ") {
                    let name = env.split('=').next().unwrap_or_default().to_string();
                    spec.env = Some(name);
                }
                if let Some(default) = bracketed(line, "[default: ") {
                    spec.default = Some(default.to_string());
                }
            }
        }
        if flags.is_empty() {
            return Err("no long flags found under `Options:` (not clap help output?)".into());
        }
        Ok(BinaryHelp { flags, takes_positionals })
    }

    /// The flag clap fills from env var `name`.
    pub fn flag_reading_env(&self, name: &str) -> Option<&str> {
        self.flags.iter().find(|(_, spec)| spec.env.as_deref() == Some(name)).map(|(flag, _)| flag.as_str())
    }
}

/// `  -h, --help  Print help` or `      --listen <LISTEN>` → (`--listen`, spec).
fn option_line(line: &str) -> Option<(String, FlagSpec)> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    if !(1..=6).contains(&indent) {
        return None;
    }
    let rest = match trimmed.strip_prefix('-') {
        Some(after) if !after.starts_with('-') => after.split_once(", ")?.1,
        _ => trimmed,
    };
    let after_dashes = rest.strip_prefix("--")?;
    let end = after_dashes.find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(after_dashes.len());
    if end == 0 {
        return None;
    }
    let tail = &after_dashes[end..];
    let takes_value = tail.starts_with(" <") || tail.starts_with("=<") || tail.starts_with(" [<") || tail.starts_with("[=<");
    Some((format!("--{}", &after_dashes[..end]), FlagSpec { takes_value, env: None, default: None }))
}

/// The text after `open` up to the next `]` on the line.
fn bracketed<'a>(line: &'a str, open: &str) -> Option<&'a str> {
    let start = line.find(open)? + open.len();
    let len = line[start..].find(']')?;
    Some(&line[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: &str = "\
Flags

Usage: fmboost-worker-x [OPTIONS]

Options:
      --redis <REDIS>
          Redis URL [env: FMBOOST_REDIS=redis://set:1] [default: redis://127.0.0.1:6379]
      --max-batch <MAX_BATCH>
          Most tasks in a batch; see also --batch-wait-ms [default: 1]
      --stack-batches
          Run a batch as one tensor batch
  -h, --help
          Print help
";

    #[test]
    fn long_help_gives_flags_values_envs_and_defaults() {
        let help = BinaryHelp::parse(LONG).unwrap();
        assert_eq!(help.flags.keys().collect::<Vec<_>>(), ["--help", "--max-batch", "--redis", "--stack-batches"]);
        let redis = &help.flags["--redis"];
        assert!(redis.takes_value);
        assert_eq!(redis.env.as_deref(), Some("FMBOOST_REDIS"));
        assert_eq!(redis.default.as_deref(), Some("redis://127.0.0.1:6379"));
        assert!(!help.flags["--stack-batches"].takes_value);
        assert_eq!(help.flags["--stack-batches"].env, None);
        assert_eq!(help.flags["--max-batch"].default.as_deref(), Some("1"));
        assert!(!help.flags.contains_key("--batch-wait-ms"), "a flag named in a description is not an option");
        assert!(!help.takes_positionals);
        assert_eq!(help.flag_reading_env("FMBOOST_REDIS"), Some("--redis"));
        assert_eq!(help.flag_reading_env("FMBOOST_NOPE"), None);
    }

    #[test]
    fn short_help_and_positionals() {
        let text = "Usage: x [OPTIONS] <FILE>\n\nArguments:\n  <FILE>  input\n\nOptions:\n      --out <OUT>  where [env: X_OUT=]\n  -v, --verbose    more\n";
        let help = BinaryHelp::parse(text).unwrap();
        assert!(help.takes_positionals);
        assert!(help.flags["--out"].takes_value);
        assert_eq!(help.flags["--out"].env.as_deref(), Some("X_OUT"));
        assert!(!help.flags["--verbose"].takes_value);
    }

    #[test]
    fn text_without_options_is_rejected() {
        assert!(BinaryHelp::parse("error: unexpected argument '--help'\n").unwrap_err().contains("no long flags"));
    }
}
