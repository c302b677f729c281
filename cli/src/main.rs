//! weftctl: the operator CLI for a Weft network. Talks to the controller's
//! AdminService with the URL, CA and token from an admin config file.

mod api;
mod cli;
mod commands;
mod duration;
mod output;
mod render;
mod view;
mod wgquick;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use clap::Parser as _;
use weft_proto::admin_config::{ADMIN_CONF, AdminConfig};

use crate::api::Api;
use crate::cli::{Cli, DEFAULT_CONFIG, Output};
use crate::commands::Printed;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    match run(cli) {
        Ok(printed) => {
            // What nodes report reaches this terminal: escaped (see output).
            let stdout = if json {
                output::json_safe(&printed.stdout)
            } else {
                output::terminal_safe(&printed.stdout)
            };
            // A closed pipe (`weftctl node list | head -1`) is not an error.
            let _ = std::io::stdout().write_all(stdout.as_bytes());
            let _ = std::io::stderr().write_all(output::terminal_safe(&printed.stderr).as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", output::terminal_safe(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<Printed> {
    let config_path = resolve_config(cli.config, Path::new(ADMIN_CONF).exists());
    let mut config = AdminConfig::load(&config_path).map_err(|e| {
        let hint = if cli_default(&config_path) {
            " (set --config or WEFT_CONFIG)"
        } else {
            ""
        };
        anyhow::anyhow!("{e}{hint}")
    })?;
    if let Some(token) = cli.token {
        config.token = token;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let api = Api::connect(&config, &config_path).await?;
        commands::run(&api, cli.command, cli.output, unix_now()).await
    })
}

/// `--config`/`WEFT_CONFIG` if given, else `./admin.conf` if it exists,
/// else the controller's data dir.
fn resolve_config(flag: Option<PathBuf>, local_exists: bool) -> PathBuf {
    match flag {
        Some(path) => path,
        None if local_exists => PathBuf::from(ADMIN_CONF),
        None => PathBuf::from(DEFAULT_CONFIG),
    }
}

fn cli_default(path: &Path) -> bool {
    path == Path::new(DEFAULT_CONFIG)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flag_wins_then_local_file_then_data_dir() {
        let flag = Some(PathBuf::from("/tmp/x.conf"));
        assert_eq!(resolve_config(flag, true), PathBuf::from("/tmp/x.conf"));
        assert_eq!(resolve_config(None, true), PathBuf::from("admin.conf"));
        assert_eq!(resolve_config(None, false), PathBuf::from(DEFAULT_CONFIG));
    }
}
