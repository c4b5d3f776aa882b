//! A reader of the Prometheus text format as weir's components write it: enough to look up
//! a sample by name and labels.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of a scrape (comments and malformed lines are skipped).
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    /// The first sample named `name` whose labels include `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.all(name)
            .find(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
    }

    /// Every sample named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (head, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(mut s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    while !s.is_empty() {
        let (key, rest) = s.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        out.insert(key.trim().to_string(), value);
        s = rest[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let s = Scrape::parse(
            "# HELP x y\nweir_agent_ready 1\nweir_agent_drops_total{reason=\"policy_ingress\"} 3\n\
             weir_agent_policy_denied_flows_total{direction=\"ingress\",policies=\"a,\\\"b\\\"\"} 2\n\
             weir_controller_compile_duration_seconds_bucket{le=\"+Inf\"} 4\nbroken line here\n",
        );
        assert_eq!(s.get("weir_agent_ready", &[]), Some(1.0));
        assert_eq!(
            s.get("weir_agent_drops_total", &[("reason", "policy_ingress")]),
            Some(3.0)
        );
        assert_eq!(
            s.get("weir_agent_drops_total", &[("reason", "policy_egress")]),
            None
        );
        assert_eq!(
            s.get(
                "weir_agent_policy_denied_flows_total",
                &[("policies", "a,\"b\"")]
            ),
            Some(2.0)
        );
        assert_eq!(
            s.get(
                "weir_controller_compile_duration_seconds_bucket",
                &[("le", "+Inf")]
            ),
            Some(4.0)
        );
        assert_eq!(s.samples.len(), 4);
    }
}
