//! Reading figures out of a Prometheus text exposition (the gateway's `/metrics`).

/// A counter's value in a Prometheus text exposition (0 when absent). `name` is matched
/// whole, labels included (`x{kind="fault"}`).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn sums_a_counter_and_skips_comments() {
        let text = "# TYPE a counter\na 2\nab 7\na 3.5\n";
        assert_eq!(metric(text, "a"), 5.5);
        assert_eq!(metric(text, "missing"), 0.0);
    }
}
