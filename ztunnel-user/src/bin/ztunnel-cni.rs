//! The chained CNI plugin: the container runtime runs it after the IP-assigning plugin to have
//! the ztunnel daemon capture each pod before it starts. See `ztunnel_user::cni`.

use std::io::{self, Write};
use std::process::ExitCode;
use ztunnel_user::cni;

fn main() -> ExitCode {
    // Stdout belongs to the CNI protocol, so diagnostics go to stderr.
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .init();

    let (output, status) = match cni::run(|name| std::env::var(name).ok(), io::stdin().lock()) {
        Ok(output) => (output, ExitCode::SUCCESS),
        Err(failure) => {
            match failure.error.details() {
                Some(details) => tracing::error!("{}: {details}", failure.error),
                None => tracing::error!("{}", failure.error),
            }
            (Some(failure.to_json()), ExitCode::FAILURE)
        }
    };
    if let Some(output) = output
        && let Err(error) = writeln!(io::stdout().lock(), "{output}")
    {
        tracing::error!("cannot write the result to stdout: {error}");
        return ExitCode::FAILURE;
    }
    status
}
