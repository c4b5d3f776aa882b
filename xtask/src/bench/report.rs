//! Figures, their statistics, and how they are printed (a markdown table per section) and
//! saved (JSON).

use std::{collections::BTreeMap, fmt::Write as _, process::Command};

use serde_json::{Value, json};

/// Which way is good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
}

impl Better {
    fn as_str(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }
}

/// One measured quantity: the value of every run, and the figure it is compared with.
#[derive(Clone, Debug)]
pub struct Figure {
    pub section: &'static str,
    /// Stable identifier, e.g. `datapath.same-node.weir-10k.tcp-1`.
    pub key: String,
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    /// Key of the baseline figure measured in the same run (same unit), if any.
    pub baseline: Option<String>,
    pub runs: Vec<f64>,
}

/// Median, min and max of a set of runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Option<Stats> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// The nearest-rank percentile `p` (0–100) of sorted `values`.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A goal weir has set itself, and whether this run shows it met.
#[derive(Clone, Debug)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Default)]
pub struct Report {
    figures: Vec<Figure>,
    index: BTreeMap<String, usize>,
    /// Configurations not measured, with the reason.
    pub skipped: Vec<String>,
    /// Remarks printed under a section's table.
    notes: BTreeMap<&'static str, Vec<String>>,
    pub goals: Vec<Goal>,
}

impl Report {
    /// Declares a figure (idempotent: a second declaration of the same key is ignored).
    pub fn define(
        &mut self,
        section: &'static str,
        key: impl Into<String>,
        label: impl Into<String>,
        unit: &'static str,
        better: Better,
        baseline: Option<String>,
    ) {
        let key = key.into();
        if self.index.contains_key(&key) {
            return;
        }
        self.index.insert(key.clone(), self.figures.len());
        self.figures.push(Figure {
            section,
            key,
            label: label.into(),
            unit,
            better,
            baseline,
            runs: Vec::new(),
        });
    }

    /// Records one run of a declared figure.
    pub fn record(&mut self, key: &str, value: f64) {
        match self.index.get(key) {
            Some(&i) => self.figures[i].runs.push(value),
            None => eprintln!("warning: a run of undeclared figure {key} is dropped"),
        }
    }

    pub fn note(&mut self, section: &'static str, text: impl Into<String>) {
        self.notes.entry(section).or_default().push(text.into());
    }

    pub fn skip(&mut self, text: impl Into<String>) {
        let text = text.into();
        println!("  skipped: {text}");
        self.skipped.push(text);
    }

    pub fn stats(&self, key: &str) -> Option<Stats> {
        self.index
            .get(key)
            .and_then(|&i| Stats::of(&self.figures[i].runs))
    }

    /// Median of `key` divided by the median of its baseline.
    pub fn ratio(&self, key: &str) -> Option<f64> {
        let f = &self.figures[*self.index.get(key)?];
        let base = self.stats(f.baseline.as_deref()?)?;
        let own = Stats::of(&f.runs)?;
        (base.median != 0.0).then(|| own.median / base.median)
    }

    /// The markdown table of one section.
    pub fn section_table(&self, section: &str) -> String {
        let mut out = String::new();
        let rows: Vec<&Figure> = self
            .figures
            .iter()
            .filter(|f| f.section == section && !f.runs.is_empty())
            .collect();
        if rows.is_empty() {
            return out;
        }
        out.push_str("| figure | unit | median | min – max | runs | baseline | ratio |\n");
        out.push_str("|---|---|---:|---:|---:|---|---:|\n");
        for f in rows {
            let Some(s) = Stats::of(&f.runs) else {
                continue;
            };
            let (baseline, ratio) = match f.baseline.as_deref() {
                Some(b) if b == f.key => ("(itself)".to_string(), "1.00×".to_string()),
                Some(b) => (
                    self.index
                        .get(b)
                        .map(|&i| differing_part(&self.figures[i].label, &f.label))
                        .unwrap_or_else(|| b.to_string()),
                    self.ratio(&f.key)
                        .map(|r| format!("{r:.2}×"))
                        .unwrap_or_else(|| "—".into()),
                ),
                None => ("—".into(), "—".into()),
            };
            // One precision per row, set by the median (none if every value is whole).
            let whole = [s.median, s.min, s.max].iter().all(|x| x.fract() == 0.0);
            let d = if whole { 0 } else { decimals(s.median) };
            let _ = writeln!(
                out,
                "| {} | {} ({} better) | {:.d$} | {:.d$} – {:.d$} | {} | {} | {} |",
                f.label,
                f.unit,
                f.better.as_str(),
                s.median,
                s.min,
                s.max,
                f.runs.len(),
                baseline,
                ratio
            );
        }
        if let Some(notes) = self.notes.get(section) {
            out.push('\n');
            for n in notes {
                let _ = writeln!(out, "* {n}");
            }
        }
        out
    }

    pub fn goals_table(&self) -> String {
        let mut out = String::new();
        if self.goals.is_empty() {
            return out;
        }
        out.push_str("| goal | measured | status |\n|---|---|---|\n");
        for g in &self.goals {
            let status = match g.met {
                Some(true) => "met",
                Some(false) => "**behind**",
                None => "not measured",
            };
            let _ = writeln!(out, "| {} | {} | {} |", g.goal, g.measured, status);
        }
        out
    }

    pub fn to_json(&self, machine: &Value, command: &str, settings: Value) -> Value {
        let figures: Vec<Value> = self
            .figures
            .iter()
            .filter(|f| !f.runs.is_empty())
            .map(|f| {
                let s = Stats::of(&f.runs);
                json!({
                    "section": f.section,
                    "key": f.key,
                    "label": f.label,
                    "unit": f.unit,
                    "better": f.better.as_str(),
                    "runs": f.runs,
                    "median": s.map(|s| s.median),
                    "min": s.map(|s| s.min),
                    "max": s.map(|s| s.max),
                    "baseline": f.baseline,
                    "ratio": self.ratio(&f.key),
                })
            })
            .collect();
        let goals: Vec<Value> = self
            .goals
            .iter()
            .map(|g| json!({"goal": g.goal, "measured": g.measured, "met": g.met}))
            .collect();
        json!({
            "command": command,
            "machine": machine,
            "settings": settings,
            "figures": figures,
            "skipped": self.skipped,
            "notes": self.notes,
            "goals": goals,
        })
    }
}

/// What sets label `other` apart from `label`: `other` without the leading and trailing
/// parts (separated by `,` or `:`) the two share. Keeps the baseline column short.
fn differing_part(other: &str, label: &str) -> String {
    let a: Vec<&str> = other.split_inclusive([',', ':']).collect();
    let b: Vec<&str> = label.split_inclusive([',', ':']).collect();
    let same = |x: &str, y: &str| {
        x.trim().trim_end_matches([',', ':']) == y.trim().trim_end_matches([',', ':'])
    };
    let prefix = a.iter().zip(&b).take_while(|(x, y)| same(x, y)).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| same(x, y))
        .count();
    let middle = a[prefix..a.len() - suffix].concat();
    let middle = middle.trim().trim_end_matches([',', ':']).trim();
    if middle.is_empty() {
        other.to_string()
    } else {
        middle.to_string()
    }
}

/// Decimals that give about three significant digits.
fn decimals(x: f64) -> usize {
    match x.abs() {
        a if a >= 100.0 => 0,
        a if a >= 10.0 => 1,
        a if a >= 1.0 => 2,
        _ => 3,
    }
}

/// About three significant digits; whole numbers without decimals.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let d = if x.fract() == 0.0 { 0 } else { decimals(x) };
    format!("{x:.d$}")
}

/// What the figures were measured on.
pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let first_line = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                let text = if o.stdout.is_empty() {
                    o.stderr
                } else {
                    o.stdout
                };
                String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_else(|| "not found".into())
    };
    let workspace = crate::workspace_root();
    let commit = Command::new("git")
        .arg("-C")
        .arg(&workspace)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let dirty = Command::new("git")
        .arg("-C")
        .arg(&workspace)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gib": (mem_gib * 10.0).round() / 10.0,
        "kernel": nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        "iptables": first_line("iptables", &["--version"]),
        "nft": first_line("nft", &["--version"]),
        "ipset": first_line("ipset", &["--version"]),
        "iperf3": first_line("iperf3", &["--version"]),
        "commit": if dirty { format!("{commit} (with uncommitted changes)") } else { commit },
        "date": first_line("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    })
}

pub fn machine_markdown(m: &Value) -> String {
    let s = |k: &str| {
        m[k].as_str()
            .map(str::to_string)
            .unwrap_or_else(|| m[k].to_string())
    };
    format!(
        "* CPU: {} ({} cores), {} GiB memory, Linux {}; load average at start {}\n* {}; {}; {}; {}\n* weir {} on {}\n",
        s("cpu"),
        s("cores"),
        s("memory_gib"),
        s("kernel"),
        s("load_average_at_start"),
        s("iptables"),
        s("nft"),
        s("ipset"),
        s("iperf3"),
        s("commit"),
        s("date"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let s = Stats::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert_eq!(Stats::of(&[5.0, 1.0, 3.0]).unwrap().median, 3.0);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn nearest_rank_percentile_picks_a_sample() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v[..10], 99.0), 10.0);
    }

    #[test]
    fn the_baseline_column_names_only_what_differs() {
        assert_eq!(
            differing_part(
                "same node, plain routing (baseline): TCP throughput, 1 stream",
                "same node, weir, 10k policies: TCP throughput, 1 stream"
            ),
            "plain routing (baseline)"
        );
        assert_eq!(
            differing_part(
                "other node, new flow, no policy (baseline)",
                "other node, new flow, 10 policies × 10 peers"
            ),
            "no policy (baseline)"
        );
        assert_eq!(differing_part("same", "same"), "same");
    }

    #[test]
    fn ratio_divides_medians_by_the_baseline_median() {
        let mut r = Report::default();
        r.define("s", "base", "base", "x", Better::Higher, None);
        r.define("s", "a", "a", "x", Better::Higher, Some("base".into()));
        for v in [10.0, 12.0, 11.0] {
            r.record("base", v);
        }
        for v in [5.0, 6.0, 5.5] {
            r.record("a", v);
        }
        assert_eq!(r.ratio("a"), Some(0.5));
        let table = r.section_table("s");
        assert!(
            table.contains("| a | x (higher better) | 5.50 | 5.00 – 6.00 | 3 | base | 0.50× |")
        );
    }
}
