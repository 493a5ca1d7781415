//! virtio-fs through the real VM path: the guest mounts a host directory and both sides see each
//! other's changes; a tree of thousands of files copies through intact; the guest cannot reach
//! outside the share; overlayfs in the guest works over a virtio-fs lower directory (the container
//! rootfs layout).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::time::Duration;

use husk_tests::batch::{chosen_test, run_batch, BatchCommand, BatchOutput};
use husk_tests::{combined, describe, ConsoleScenario};

/// All of the scenarios together (~4 min in CI).
const BUDGET: Duration = Duration::from_secs(1500);
const FILES: usize = 2000;

/// Every test's VM run below, one after another in one boot of the test host (on first use):
/// each boots a guest of its own over a share of its own.
static RUNS: OnceLock<BatchOutput> = OnceLock::new();

/// A test's name and what makes its scenario.
type NamedScenario = (&'static str, fn() -> ConsoleScenario);

/// Each test's scenario, by the test's name: a run of chosen tests runs only theirs.
const SCENARIOS: &[NamedScenario] = &[
    (
        "guest_and_host_see_each_others_file_operations",
        guest_and_host_see_each_others_file_operations_scenario,
    ),
    (
        "a_tree_of_thousands_of_files_copies_through_the_share_intact",
        a_tree_of_thousands_of_files_copies_through_the_share_intact_scenario,
    ),
    (
        "the_guest_cannot_reach_outside_the_shared_directory",
        the_guest_cannot_reach_outside_the_shared_directory_scenario,
    ),
    (
        "a_symlink_race_from_two_guest_processes_neither_escapes_nor_wedges",
        a_symlink_race_from_two_guest_processes_neither_escapes_nor_wedges_scenario,
    ),
    (
        "overlayfs_in_the_guest_works_over_a_virtio_fs_lower_directory",
        overlayfs_in_the_guest_works_over_a_virtio_fs_lower_directory_scenario,
    ),
    (
        "a_guest_holding_too_many_files_gets_enfile_and_the_host_stays_within_the_bound",
        a_guest_holding_too_many_files_gets_enfile_and_the_host_stays_within_the_bound_scenario,
    ),
    (
        "a_large_file_reads_back_whole_while_its_pages_are_dropped_and_read_again",
        a_large_file_reads_back_whole_while_its_pages_are_dropped_and_read_again_scenario,
    ),
];

/// The output of test `name`'s scenario, whose VM ran and ended well.
fn scenario_output(name: &str) -> String {
    let runs = RUNS.get_or_init(|| {
        let chosen: Vec<BatchCommand> = SCENARIOS
            .iter()
            .filter(|(test, _)| chosen_test(test))
            .map(|(test, scenario)| BatchCommand::new(test, &["sh", "-c", &scenario().script()]))
            .collect();
        run_batch(BUDGET, &[], &chosen)
    });
    let output = runs.get(name);
    let text = combined(output);
    assert!(text.contains("vmm-status=0"), "{}", describe(output));
    assert!(!text.contains("guest never reached"), "{text}");
    text
}

fn shared(steps: &str) -> ConsoleScenario {
    ConsoleScenario {
        host_setup: "mkdir -p $work/share".into(),
        vmm_args: "--fs share=$work/share".into(),
        steps: format!("guest mkdir -p /mnt/share; guest mount -t virtiofs share /mnt/share\n{steps}"),
        ..Default::default()
    }
}

fn guest_and_host_see_each_others_file_operations_scenario() -> ConsoleScenario {
    let mut scenario = shared(
        "guest 'cd /mnt/share && echo from-guest > g.txt && mkdir d && echo data > d/f && mv d/f d/moved'
  guest 'echo gone > del.txt && rm del.txt && chmod 0640 g.txt && ln -s g.txt sym && ln g.txt hard'
  sync_guest guest-ops
  echo host-content > $work/share/h.txt; mkdir $work/share/hd; chmod 0600 $work/share/h.txt
  guest 'echo \"guest-sees=$(cat /mnt/share/h.txt) $(stat -c %a /mnt/share/h.txt) $(ls -d /mnt/share/hd)\"'
  guest 'stat -c \"links=%h\" /mnt/share/g.txt; echo \"guest-readlink=$(readlink /mnt/share/sym)\"'
  sync_guest host-ops",
    );
    scenario.host_checks = "cd $work/share && echo \"host-sees g=$(cat g.txt) mode=$(stat -c %a g.txt) \
         moved=$(cat d/moved) f=$(ls d/f 2>/dev/null | wc -l) del=$(ls del.txt 2>/dev/null | wc -l) \
         sym=$(readlink sym) links=$(stat -c %h hard) inode-same=$([ g.txt -ef hard ] && echo yes)\"; cd /"
        .into();
    scenario
}

#[test]
fn guest_and_host_see_each_others_file_operations() {
    let text = scenario_output("guest_and_host_see_each_others_file_operations");
    assert!(
        text.contains(
            "host-sees g=from-guest mode=640 moved=data f=0 del=0 sym=g.txt links=2 inode-same=yes"
        ),
        "the host sees the guest's create, write, rename, delete, chmod, symlink and hard link: {text}"
    );
    assert!(text.contains("guest-sees=host-content 600 /mnt/share/hd"), "the guest sees the host's: {text}");
    assert!(text.contains("links=2") && text.contains("guest-readlink=g.txt"), "{text}");
}

fn a_tree_of_thousands_of_files_copies_through_the_share_intact_scenario() -> ConsoleScenario {
    let tree_sum = "find . -type f | sort | xargs sha256sum | sha256sum | cut -c1-64";
    let mut scenario = shared(&format!(
        "guest 'cd /mnt/share/src && echo \"guest-src-sum=$({tree_sum})\"; cd /'
  guest 'cp -a /mnt/share/src /mnt/share/copy && echo \"guest-copy-files=$(find /mnt/share/copy -type f | wc -l)\"'
  sync_guest copied"
    ));
    scenario.host_setup = format!(
        "mkdir -p $work/share/src; i=0; while [ $i -lt {FILES} ]; do d=$work/share/src/d$((i % 40)); \
         mkdir -p $d; j=0; : > $d/f$i; while [ $j -lt $((i % 7)) ]; do \
         printf 'line %s of file %s\\n' $j $i >> $d/f$i; j=$((j+1)); done; i=$((i+1)); done
         echo \"host-src-sum=$(cd $work/share/src && {tree_sum})\""
    );
    scenario.host_checks = format!("echo \"host-copy-sum=$(cd $work/share/copy && {tree_sum})\"");
    scenario
}

#[test]
fn a_tree_of_thousands_of_files_copies_through_the_share_intact() {
    let text = scenario_output("a_tree_of_thousands_of_files_copies_through_the_share_intact");
    let sum = |key: &str| {
        // The last one: the console also echoes the command line that prints it.
        text.lines()
            .rev()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_owned()))
            .unwrap_or_default()
    };
    let host_src = sum("host-src-sum=");
    assert_eq!(host_src.len(), 64, "{text}");
    assert!(text.contains(&format!("guest-copy-files={FILES}")), "{text}");
    assert_eq!(sum("guest-src-sum="), host_src, "the guest reads every file as the host wrote it");
    assert_eq!(sum("host-copy-sum="), host_src, "the guest's copy lands on the host intact");
}

/// A share holding symlinks that point outside it, and a secret just outside it.
fn escape_setup() -> String {
    "mkdir -p $work/share; echo TOP-SECRET-$((1000+337)) > $work/outside-secret
  ln -s $work/outside-secret $work/share/abs; ln -s ../outside-secret $work/share/rel
  ln -s $work $work/share/dir-link"
        .into()
}

fn the_guest_cannot_reach_outside_the_shared_directory_scenario() -> ConsoleScenario {
    let mut scenario = shared(
        "guest 'cat /mnt/share/abs /mnt/share/rel /mnt/share/../outside-secret /mnt/share/dir-link/outside-secret'
  guest 'mknod /mnt/share/null c 1 3 || echo mknod-refused'
  guest 'mkfifo /mnt/share/fifo && echo fifo-ok'
  guest 'cd /mnt/share; i=0; while [ $i -lt 50 ]; do rm -rf swap; mkdir swap; cat swap/../outside-secret 2>/dev/null; rm -rf swap; ln -s / swap; cat swap/outside-secret swap/../outside-secret 2>/dev/null; i=$((i+1)); done; cd /'
  sync_guest escapes",
    );
    scenario.host_setup = escape_setup();
    scenario.host_checks =
        "echo \"host-null=$(ls $work/share/null 2>/dev/null | wc -l) host-fifo=$([ -p $work/share/fifo ] && echo yes)\""
            .into();
    scenario
}

#[test]
fn the_guest_cannot_reach_outside_the_shared_directory() {
    let text = scenario_output("the_guest_cannot_reach_outside_the_shared_directory");
    assert!(!text.contains("TOP-SECRET-1337"), "no path reached the host file outside the share: {text}");
    assert!(text.contains("mknod-refused") && text.contains("host-null=0"), "no device node: {text}");
    assert!(text.contains("fifo-ok") && text.contains("host-fifo=yes"), "FIFOs are fine: {text}");
}

/// Two guest processes racing a directory/symlink swap against lookups through it: nothing
/// escapes the share, and the shell's `wait` sees its background job end. (That `wait` once slept
/// forever: the debug console inherited PID 1's blocked SIGCHLD.)
fn a_symlink_race_from_two_guest_processes_neither_escapes_nor_wedges_scenario() -> ConsoleScenario {
    let mut scenario = shared(
        "guest 'echo \"console-$(grep SigBlk /proc/$$/status)\"'
  guest 'cd /mnt/share; i=0; while [ $i -lt 100 ]; do rm -rf race; mkdir race; rm -rf race; ln -s / race; i=$((i+1)); done & j=0; while [ $j -lt 100 ]; do cat race/outside-secret race/../outside-secret 2>/dev/null; j=$((j+1)); done; wait; echo \"race-waited=$?\"; cd /'
  sync_guest raced",
    );
    scenario.host_setup = escape_setup();
    scenario
}

#[test]
fn a_symlink_race_from_two_guest_processes_neither_escapes_nor_wedges() {
    let text = scenario_output("a_symlink_race_from_two_guest_processes_neither_escapes_nor_wedges");
    assert!(
        text.contains("console-SigBlk:\t0000000000000000"),
        "the shell starts with no signal blocked: {text}"
    );
    assert!(text.contains("race-waited=0"), "{text}");
    assert!(!text.contains("TOP-SECRET-1337"), "no path reached the host file outside the share: {text}");
}

fn overlayfs_in_the_guest_works_over_a_virtio_fs_lower_directory_scenario() -> ConsoleScenario {
    let mut scenario = shared(
        "guest 'mkdir -p /tmp/up /tmp/work /merged && mount -t overlay overlay -o lowerdir=/mnt/share/lower,upperdir=/tmp/up,workdir=/tmp/work /merged && echo overlay-mounted'
  guest 'echo \"merged-reads=$(cat /merged/etc/os-release)\"; echo changed > /merged/etc/os-release; rm /merged/bin/tool; echo new > /merged/new'
  guest 'echo \"merged-now=$(cat /merged/etc/os-release) tool=$(ls /merged/bin | wc -l) new=$(cat /merged/new)\"'
  guest 'echo \"whiteout=$(stat -c %t:%T /tmp/up/bin/tool)\"'
  sync_guest overlay",
    );
    scenario.host_setup = "mkdir -p $work/share/lower/etc $work/share/lower/bin
  echo image-v1 > $work/share/lower/etc/os-release; echo tool > $work/share/lower/bin/tool"
        .into();
    scenario.host_checks = "echo \"lower-after=$(cat $work/share/lower/etc/os-release) \
        tool=$(cat $work/share/lower/bin/tool) new=$(ls $work/share/lower/new 2>/dev/null | wc -l)\""
        .into();
    scenario
}

#[test]
fn overlayfs_in_the_guest_works_over_a_virtio_fs_lower_directory() {
    let text = scenario_output("overlayfs_in_the_guest_works_over_a_virtio_fs_lower_directory");
    assert!(text.contains("overlay-mounted"), "{text}");
    assert!(text.contains("merged-reads=image-v1"), "{text}");
    assert!(text.contains("merged-now=changed tool=0 new=new"), "{text}");
    assert!(text.contains("whiteout=0:0"), "the deletion is a whiteout in the upper layer: {text}");
    assert!(text.contains("lower-after=image-v1 tool=tool new=0"), "the image is untouched: {text}");
}

/// A guest that looks up and opens more files than the share may hold for it (`--fs-max-fds`):
/// beyond the bound its opens fail with ENFILE, the VMM's own descriptors stay within it, and
/// what the guest forgets makes room again.
fn a_guest_holding_too_many_files_gets_enfile_and_the_host_stays_within_the_bound_scenario() -> ConsoleScenario
{
    let mut scenario = shared(
        "guest 'cd /mnt/share/many; ok=0; i=0; while [ $i -lt 1000 ]; do { read -r l < f$i; } 2>>/tmp/err && ok=$((ok+1)); i=$((i+1)); done; echo \"opened=$ok\"; grep -c \"Too many open files in system\" /tmp/err | sed s/^/refused=/'
  sync_guest exhausted
  echo \"host-fds=$(ls /proc/$(pidof husk-vmm)/fd | wc -l)\" >&2
  guest 'echo 3 > /proc/sys/vm/drop_caches; i=0; until read -r l < f999 2>/dev/null || [ $i -ge 50 ]; do sleep 0.2; i=$((i+1)); done; echo \"after-forget=$l\"; cd /'
  sync_guest forgotten",
    );
    scenario.host_setup =
        "mkdir -p $work/share/many; i=0; while [ $i -lt 1000 ]; do echo x > $work/share/many/f$i; i=$((i+1)); done"
            .into();
    scenario.vmm_args.push_str(" --fs-max-fds 300");
    scenario
}

#[test]
fn a_guest_holding_too_many_files_gets_enfile_and_the_host_stays_within_the_bound() {
    let text =
        scenario_output("a_guest_holding_too_many_files_gets_enfile_and_the_host_stays_within_the_bound");
    let value = |key: &str| -> usize {
        // The last one: the console also echoes the command line that prints it.
        text.lines()
            .rev()
            .find_map(|l| l.split_once(key).and_then(|(_, v)| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {key}: {text}"))
    };
    let opened = value("opened=");
    assert!((200..300).contains(&opened), "the guest held up to the bound, not beyond: {opened}: {text}");
    assert_eq!(value("refused=") + opened, 1000, "every other open failed with ENFILE: {text}");
    // The VMM's own descriptors (KVM, eventfds, sockets: a few dozen) besides the bound; without
    // it, one per file the guest opened.
    assert!(value("host-fds=") < 400, "{text}");
    assert!(text.contains("after-forget=x"), "forgotten inodes make room again: {text}");
}

/// Four readers at once (three `md5sum`s, a `dd` in 32 KiB blocks) and a fifth reading it twice over,
/// in rounds with the guest's page cache dropped between them: every open makes the guest drop the
/// file's cached pages and read it again through the share, where a reply cut short would end
/// the file early for the guest (`whole_read`).
fn a_large_file_reads_back_whole_while_its_pages_are_dropped_and_read_again_scenario() -> ConsoleScenario {
    let mut scenario = shared(
        "guest 'cd /mnt/share; r=0; while [ $r -lt 40 ]; do echo 3 > /proc/sys/vm/drop_caches; for k in 1 2 3; do md5sum < big >> /tmp/sums & done; cat big big > /dev/null & dd if=big bs=32k 2>/dev/null | md5sum >> /tmp/sums; wait; stat -c %s big >> /tmp/sizes; r=$((r+1)); done; for k in sums sizes; do sort /tmp/$k | uniq -c | sed \"s/^ */$k-seen=/\"; done; cd /'
  sync_guest read",
    );
    scenario.host_setup = "mkdir -p $work/share; head -c 3000000 /dev/urandom > $work/share/big; \
         echo \"host-sum=$(md5sum < $work/share/big)\""
        .into();
    scenario
}

#[test]
fn a_large_file_reads_back_whole_while_its_pages_are_dropped_and_read_again() {
    let text = scenario_output("a_large_file_reads_back_whole_while_its_pages_are_dropped_and_read_again");
    let seen = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let host_sum = seen("host-sum=");
    let host_sum = host_sum.first().unwrap_or_else(|| panic!("no host-sum: {text}"));
    assert_eq!(seen("sums-seen="), vec![format!("160 {host_sum}")], "every read, whole and intact: {text}");
    assert_eq!(
        seen("sizes-seen="),
        vec!["40 3000000".to_owned()],
        "the guest never saw the file shrink: {text}"
    );
}
