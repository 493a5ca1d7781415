//! Several VM-host commands in one boot of the test host: a test file whose tests each need one
//! command on the VM host runs them all, one after another, in a single `tests/testhost/run`
//! (a boot costs ~10 s under emulation; keep the [`BatchOutput`] in a `OnceLock` that the first
//! test fills), and each test reads its own command's output.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Output};
use std::time::Duration;

use crate::{describe, run, VmHost};

const BEGIN: &str = "@@husk-batch begin ";
const END: &str = "@@husk-batch end ";

/// One command of a batch: a name (unique in the batch) and its argument vector.
#[derive(Debug, Clone)]
pub struct BatchCommand {
    pub name: &'static str,
    pub args: Vec<String>,
}

impl BatchCommand {
    pub fn new(name: &'static str, args: &[&str]) -> BatchCommand {
        BatchCommand { name, args: args.iter().map(|arg| (*arg).to_owned()).collect() }
    }
}

/// What a batch printed: each command's output and status by name, and the whole run's.
#[derive(Debug)]
pub struct BatchOutput {
    whole: Output,
    parts: HashMap<String, Output>,
}

impl BatchOutput {
    /// The parts of `whole`, the output of a [`batch_script`].
    pub fn split(whole: Output) -> BatchOutput {
        let parts = split_output(&String::from_utf8_lossy(&whole.stdout));
        BatchOutput { whole, parts }
    }

    /// Command `name`'s output (stdout and stderr together, as through the test host; stderr
    /// empty) with its own exit status.
    ///
    /// # Panics
    /// When the batch never finished that command (the whole run's output is in the message).
    pub fn get(&self, name: &str) -> &Output {
        self.parts.get(name).unwrap_or_else(|| {
            panic!("the batch's command {name:?} did not finish: {}", describe(&self.whole))
        })
    }
}

/// Runs `commands` one after another in one boot of the VM host (`files`: host files they need
/// there, see [`VmHost::command_with`]) and splits the output.
pub fn run_batch(timeout: Duration, files: &[&Path], commands: &[BatchCommand]) -> BatchOutput {
    let script = batch_script(commands);
    BatchOutput::split(run(&mut VmHost::detect().command_with(timeout, files, &["sh", "-c", &script])))
}

/// A shell script running `commands` in turn, each with stdin from /dev/null and stderr on
/// stdout, between a begin line and an end line that carries its exit status.
pub fn batch_script(commands: &[BatchCommand]) -> String {
    let mut script = String::new();
    for command in commands {
        let words: Vec<String> = command.args.iter().map(|arg| shell_quote(arg)).collect();
        script.push_str(&format!(
            "printf '\\n{BEGIN}%s\\n' {name}\n{words} </dev/null 2>&1\nprintf '\\n{END}%s status=%d\\n' {name} $?\n",
            name = shell_quote(command.name),
            words = words.join(" "),
        ));
    }
    script
}

/// Each finished command's output (without the newline the end line adds before itself).
fn split_output(text: &str) -> HashMap<String, Output> {
    let mut parts = HashMap::new();
    let mut rest = text;
    while let Some(begin) = rest.find(BEGIN) {
        let after = &rest[begin + BEGIN.len()..];
        let Some((name, body)) = after.split_once('\n') else { break };
        let end_line = format!("\n{END}{name} status=");
        let Some(end) = body.find(&end_line) else { break };
        let status_text = &body[end + end_line.len()..];
        let code: i32 = status_text.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(-1);
        parts.insert(
            name.to_owned(),
            Output {
                status: ExitStatus::from_raw((code & 0xff) << 8),
                stdout: body.as_bytes()[..end].to_vec(),
                stderr: Vec::new(),
            },
        );
        rest = status_text;
    }
    parts
}

/// Whether the test `name` is one the running test binary was asked for: its command line's
/// filters, `--exact` and `--skip`, read as libtest reads them. A batch made for the tests of a
/// file runs only the commands of the chosen ones (`cargo test --test F NAME` boots for NAME's).
pub fn chosen_test(name: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    chosen_by(&args, name)
}

/// [`chosen_test`] for the arguments `args` (without the program).
fn chosen_by(args: &[String], name: &str) -> bool {
    // libtest's options that take their value as the next argument.
    const TAKES_VALUE: &[&str] =
        &["--test-threads", "--logfile", "--format", "--color", "-Z", "--shuffle-seed"];
    let (mut filters, mut skips, mut exact) = (Vec::<&str>::new(), Vec::<&str>::new(), false);
    let mut args = args.iter().map(String::as_str);
    while let Some(arg) = args.next() {
        match arg {
            "--exact" => exact = true,
            "--skip" => skips.extend(args.next()),
            option if TAKES_VALUE.contains(&option) => {
                args.next();
            }
            option if option.starts_with('-') => {
                if let Some(skip) = option.strip_prefix("--skip=") {
                    skips.push(skip);
                }
            }
            filter => filters.push(filter),
        }
    }
    let matches = |pattern: &&str| if exact { name == *pattern } else { name.contains(*pattern) };
    (filters.is_empty() || filters.iter().any(matches)) && !skips.iter().any(matches)
}

/// `word` quoted for sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scripts_output_splits_into_each_commands_output_and_status() {
        let commands = [
            BatchCommand::new("first", &["sh", "-c", "echo one; echo two >&2; exit 3"]),
            BatchCommand::new("second", &["printf", "it's %s", "unterminated"]),
            BatchCommand::new("never", &["sh", "-c", "kill -9 $PPID"]),
            BatchCommand::new("after", &["true"]),
        ];
        let output = run(std::process::Command::new("sh").arg("-c").arg(batch_script(&commands)));
        let parts = split_output(&String::from_utf8_lossy(&output.stdout));
        assert_eq!(parts["first"].status.code(), Some(3));
        assert_eq!(String::from_utf8_lossy(&parts["first"].stdout), "one\ntwo\n");
        assert_eq!(parts["second"].status.code(), Some(0));
        assert_eq!(String::from_utf8_lossy(&parts["second"].stdout), "it's unterminated");
        assert!(!parts.contains_key("never") && !parts.contains_key("after"), "{parts:?}");
    }

    #[test]
    fn a_test_is_chosen_by_the_filters_exact_and_skip_as_libtest_reads_them() {
        let args = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let name = "a_crashed_agent_ends_the_pods_tasks";
        assert!(chosen_by(&args("--test-threads 2"), name), "no filter: every test");
        assert!(chosen_by(&args("crashed_agent --nocapture"), name));
        assert!(!chosen_by(&args("--test-threads 2 hung_agent"), name), "a value is no filter");
        assert!(chosen_by(&args("hung_agent crashed"), name), "any filter");
        assert!(!chosen_by(&args("--exact crashed_agent"), name));
        assert!(chosen_by(&args(&format!("--exact {name}")), name));
        assert!(!chosen_by(&args("--skip crashed"), name));
        assert!(!chosen_by(&args("agent --skip=crashed"), name));
        assert!(chosen_by(&args("--skip hung"), name));
    }
}
