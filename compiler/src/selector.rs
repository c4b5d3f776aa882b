//! Label selectors in a normalized form: a conjunction of requirements, sorted and without
//! duplicates, so that two selectors that mean the same thing compare equal and are
//! evaluated once per compile.
//!
//! Semantics are those of `metav1.LabelSelector`
//! (<https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/#resources-that-support-set-based-requirements>):
//! `matchLabels` entries and `matchExpressions` are ANDed; an empty selector matches
//! everything; `NotIn` matches objects without the key.

pub use super::labels::Labels;

/// One requirement on a label key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    /// The key is present with one of the values (sorted, non-empty). `matchLabels` entries
    /// become `In` with one value.
    In(Vec<String>),
    /// The key is absent, or present with none of the values (sorted, non-empty).
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

impl Requirement {
    pub fn new(key: impl Into<String>, operator: Operator) -> Self {
        let operator = match operator {
            Operator::In(v) => Operator::In(sorted_unique(v)),
            Operator::NotIn(v) => Operator::NotIn(sorted_unique(v)),
            other => other,
        };
        Self {
            key: key.into(),
            operator,
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        let listed =
            |values: &[String], v: &str| values.binary_search_by(|x| x.as_str().cmp(v)).is_ok();
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| listed(values, v)),
            Operator::NotIn(values) => value.is_none_or(|v| !listed(values, v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

fn sorted_unique(mut v: Vec<String>) -> Vec<String> {
    v.sort_unstable();
    v.dedup();
    v
}

/// A conjunction of requirements. The empty selector matches every object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches every object (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn new(requirements: impl IntoIterator<Item = Requirement>) -> Self {
        let mut requirements: Vec<Requirement> = requirements.into_iter().collect();
        requirements.sort_unstable();
        requirements.dedup();
        Self { requirements }
    }

    /// `matchLabels` alone.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self::new(
            labels
                .into_iter()
                .map(|(k, v)| Requirement::new(k, Operator::In(vec![v.to_owned()]))),
        )
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// The `In` requirements, which an index of (key, value) → objects can answer directly:
    /// every match has one of these (key, value) pairs.
    pub fn indexable(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.requirements.iter().filter_map(|r| match &r.operator {
            Operator::In(values) => Some((r.key.as_str(), values.as_slice())),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().copied().collect()
    }

    fn req(key: &str, op: Operator) -> Requirement {
        Requirement::new(key, op)
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(Selector::everything().matches(&labels(&[])));
        assert!(Selector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_require_every_pair() {
        let s = Selector::from_labels([("app", "web"), ("tier", "front")]);
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "front"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "back")])));
    }

    #[test]
    fn in_requires_key_present_with_listed_value() {
        let r = req("env", Operator::In(strings(&["prod", "qa"])));
        assert!(r.matches(&labels(&[("env", "qa")])));
        assert!(!r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&labels(&[])));
    }

    #[test]
    fn not_in_matches_objects_without_the_key() {
        let r = req("env", Operator::NotIn(strings(&["prod"])));
        assert!(r.matches(&labels(&[])));
        assert!(r.matches(&labels(&[("env", "dev")])));
        assert!(!r.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist_ignore_the_value() {
        let e = req("k", Operator::Exists);
        let d = req("k", Operator::DoesNotExist);
        assert!(e.matches(&labels(&[("k", "")])));
        assert!(!e.matches(&labels(&[])));
        assert!(d.matches(&labels(&[])));
        assert!(!d.matches(&labels(&[("k", "v")])));
    }

    #[test]
    fn equivalent_selectors_compare_equal() {
        let a = Selector::new([
            req("b", Operator::In(strings(&["y", "x", "x"]))),
            req("a", Operator::Exists),
        ]);
        let b = Selector::new([
            req("a", Operator::Exists),
            req("b", Operator::In(strings(&["x", "y"]))),
            req("a", Operator::Exists),
        ]);
        assert_eq!(a, b);
        assert_eq!(
            Selector::from_labels([("k", "v")]),
            Selector::new([req("k", Operator::In(strings(&["v"])))])
        );
    }
}
