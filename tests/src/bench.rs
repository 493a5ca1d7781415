//! What the benchmarks share: summary statistics and how to name where they ran.

/// Median, min and max of `values` (`NaN`s when it is empty).
pub fn spread(values: &[f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
    (median, sorted[0], sorted[n - 1])
}

/// Where the VM ran, for a report's heading: absolute figures from the nested test host are
/// emulated and only their ratios mean something.
pub fn vm_host_description() -> &'static str {
    if std::env::var_os("HUSK_IN_TESTHOST").is_some() {
        "nested test host (QEMU TCG + kvm-amd): compare ratios, not absolute figures"
    } else {
        "this machine's KVM"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_of_odd_and_even_samples() {
        assert_eq!(spread(&[3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
        assert!(spread(&[]).0.is_nan());
    }
}
