//! A pod behaves under Husk as under runc: every CRI conformance check (`husk_tests::conformance`)
//! runs with the `runc` and the `husk` handler of one containerd in the test host, and Husk must
//! pass what runc passes, except the differences listed here (each also in docs/conformance.md).

// Test code: a failed expectation is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use husk_tests::conformance::CHECKS;
use husk_tests::containerd::with_containerd;
use husk_tests::target_bin;

/// Checks Husk fails today, with why; a listed check that passes fails this test, so the list
/// (and docs/conformance.md) stays true.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[(
    "a_recursive_read_only_volume_is_read_only_all_through",
    "containerd 2.1 asks only runc-type runtimes for their features, so it reports no \
         recursive read-only mounts for the husk handler (Husk's -info lists rro; containerd#13504 \
         asks every runtime)",
)];

/// `(passed, detail)` of `check` with `handler` in the probe's output.
fn outcome<'a>(text: &'a str, check: &str, handler: &str) -> (bool, &'a str) {
    let prefix = format!("check {check} {handler} ");
    let rest = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    let rest = rest.unwrap_or_else(|| panic!("no outcome of {check} with {handler}: {text}"));
    let (verdict, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    (verdict == "pass", detail)
}

#[test]
fn a_pod_under_husk_behaves_as_under_runc_in_every_cri_conformance_check() {
    let steps = format!(
        "work=$(mktemp -d)
{probe} \"$CONTAINERD_ADDRESS\" $work runc husk; status=$?; echo \"conformance-status=$status\"
# A probe that lost containerd names why (containerd's panic or last lines).
[ $status = 0 ] || {{ grep -A 40 '^panic' $CONTAINERD_LOG || tail -40 $CONTAINERD_LOG; }}
rm -rf $work",
        probe = target_bin("husk-cri-conformance").display()
    );
    let text = with_containerd("conformance", &steps);
    println!("{text}");
    assert!(text.contains("conformance-status=0"), "{text}");
    let mut unexpected = Vec::new();
    for &check in CHECKS {
        let (runc_passed, runc_detail) = outcome(&text, check, "runc");
        assert!(runc_passed, "runc fails {check} (the check or the test host is wrong): {runc_detail}");
        let (husk_passed, husk_detail) = outcome(&text, check, "husk");
        match (husk_passed, KNOWN_DIFFERENCES.iter().find(|(c, _)| *c == check)) {
            (false, None) => unexpected.push(format!("{check}: {husk_detail}")),
            (true, Some((_, why))) => unexpected.push(format!("{check} passes now (listed as: {why})")),
            _ => {}
        }
    }
    assert!(unexpected.is_empty(), "Husk differs from runc:\n{}\n\n{text}", unexpected.join("\n"));
}
