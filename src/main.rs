//! The `openai-api-route` binary: parse flags, load the config, run until a signal.

use std::process::ExitCode;

use openai_api_route::cli::{list_text, Cli};
use openai_api_route::server::{self, StartError};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::from_env();
    let cfg = match server::load_config(&cli) {
        Ok(cfg) => cfg,
        Err(StartError::Config(errors)) => {
            for e in &errors.0 {
                eprintln!("openai-api-route: config error: {e}");
            }
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("openai-api-route: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.list {
        print!("{}", list_text(&cfg));
        return ExitCode::SUCCESS;
    }
    match server::run(cli, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("openai-api-route: {e}");
            ExitCode::from(1)
        }
    }
}
