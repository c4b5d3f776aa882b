//! Label sets of pods and namespaces, stored compactly: a sorted boxed slice of pairs.
//! (A `BTreeMap<String, String>` costs about half a kilobyte even for one label; with
//! 100,000 pods that is the largest part of the store.)

use std::collections::BTreeMap;

/// Labels of one object: unique keys, sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Labels {
    pairs: Box<[(Box<str>, Box<str>)]>,
}

impl Labels {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.pairs[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// Sets `key` to `value`, replacing any previous value.
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        let mut pairs = std::mem::take(&mut self.pairs).into_vec();
        match pairs.binary_search_by(|(k, _)| (**k).cmp(key.as_str())) {
            Ok(i) => pairs[i].1 = value.into_boxed_str(),
            Err(i) => pairs.insert(i, (key.into_boxed_str(), value.into_boxed_str())),
        }
        self.pairs = pairs.into_boxed_slice();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Labels {
    /// Later values win for repeated keys.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        map.into()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Self {
            pairs: map
                .into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_inserts_keep_keys_unique_and_sorted() {
        let mut l: Labels = [("b", "2"), ("a", "1"), ("b", "3")].into_iter().collect();
        assert_eq!(l.get("a"), Some("1"));
        assert_eq!(l.get("b"), Some("3"));
        assert_eq!(l.get("c"), None);
        l.insert("c", "4");
        l.insert("a", "0");
        assert_eq!(
            l.iter().collect::<Vec<_>>(),
            [("a", "0"), ("b", "3"), ("c", "4")]
        );
        assert_eq!(l.len(), 3);
    }
}
