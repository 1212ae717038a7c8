//! Reading Prometheus/OpenMetrics text back into samples, for `clubcast top` and for tests that
//! check what the relay exports. Lines that are not samples are skipped; a malformed sample line
//! is skipped too, never a panic.

/// One sample: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample name (`clubcast_relay_dropped_total`).
    pub name: String,
    /// Label pairs in the order written.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample in `text`.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let (labels, rest) = if line[name_end..].starts_with('{') {
        parse_labels(&line[name_end + 1..])?
    } else {
        (Vec::new(), &line[name_end..])
    };
    // The value, then an optional timestamp or exemplar.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Labels after the `{`; the labels and the text after the closing `}`.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        let mut chars = s[eq + 1..].char_indices();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            match (escaped, c) {
                (true, 'n') => value.push('\n'),
                (true, c) => value.push(c),
                (false, '\\') => {
                    escaped = true;
                    continue;
                }
                (false, '"') => {
                    end = Some(eq + 1 + i + 1);
                    break;
                }
                (false, c) => value.push(c),
            }
            escaped = false;
        }
        labels.push((key, value));
        s = &s[end?..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_values_and_skips_junk() {
        let text = "# HELP x y\n# TYPE x counter\nx_total 3\n\
                    drops_total{reason=\"bad \\\"sig\\\"\",worker=\"1\"} 4.5\n\
                    h_bucket{le=\"+Inf\"} 7 1700000000\n\
                    g -Inf\nbroken{a=\"1\" 2\n{a=\"1\"} 3\nnovalue\n# EOF\n";
        let s = parse_samples(text);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s[0].name, "x_total");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].label("reason"), Some("bad \"sig\""));
        assert_eq!(s[1].label("worker"), Some("1"));
        assert_eq!(s[1].value, 4.5);
        assert_eq!(s[2].label("le"), Some("+Inf"));
        assert_eq!(s[3].value, f64::NEG_INFINITY);
    }

    #[test]
    fn reads_what_the_relay_renders() {
        let m = super::super::RelayMetrics::new("portable", 1);
        let samples = parse_samples(&m.render());
        let forwarded = samples
            .iter()
            .find(|s| s.name == "clubcast_relay_pieces_forwarded_total")
            .unwrap();
        assert_eq!(forwarded.value, 0.0);
        assert!(samples
            .iter()
            .any(|s| s.name == "clubcast_build_info" && s.label("backend") == Some("portable")));
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = parse_samples(&text);
        }
    }
}
