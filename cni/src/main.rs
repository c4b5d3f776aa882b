//! `weir-cni`: the CNI plugin binary. See the library docs for what it does.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let outcome = weir_cni::plugin::run(
        |name| std::env::var_os(name).map(|value| value.to_string_lossy().into_owned()),
        std::io::stdin().lock(),
        std::io::stderr().lock(),
    );
    let mut stdout = std::io::stdout().lock();
    // If stdout is gone the runtime cannot read any answer; the exit code still tells.
    let _ignored = stdout
        .write_all(outcome.stdout.as_bytes())
        .and_then(|()| stdout.flush());
    ExitCode::from(outcome.exit_code)
}
