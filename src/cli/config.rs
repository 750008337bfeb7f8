//! `beltad config`: print a complete, validated configuration as TOML.

use std::process::ExitCode;

use clap::Args;

use super::ConfigArgs;

/// Print the configuration a fit would use, every field written out.
///
/// Start a config file from it: `beltad config --preset default > my.toml`,
/// edit, then `beltad fit --config my.toml ...`.
#[derive(Debug, Args)]
pub struct ConfigCmdArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: &ConfigCmdArgs) -> anyhow::Result<ExitCode> {
    print!("{}", args.config.load()?.to_toml());
    Ok(ExitCode::SUCCESS)
}
