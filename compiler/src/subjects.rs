//! Which ClusterNetworkPolicies apply to which pods.
//!
//! A pod's rule sets list the ClusterNetworkPolicies whose subject selects it. Testing every
//! ClusterNetworkPolicy's subject for every pod of every node costs (pods × cluster
//! policies) lookups per compile: 100 million for 100,000 pods and 1,000 policies. The
//! subjects' members are evaluated once per compile anyway (the `peers` module), so the
//! compile inverts them once into this index, and a pod finds its policies in one slice.

use super::cluster::PodIdx;

/// For each pod, the positions (in the order the subjects were given, i.e. evaluation
/// order) of the subjects that select it. Stored flat: `start[pod] .. start[pod + 1]` is the
/// pod's run in `positions`.
#[derive(Debug, Default)]
pub(crate) struct SubjectIndex {
    start: Vec<u32>,
    positions: Vec<u32>,
}

impl SubjectIndex {
    /// `subjects[i]`: the sorted pods the `i`-th policy's subject selects.
    pub fn new(subjects: &[&[PodIdx]]) -> Self {
        let pods = subjects
            .iter()
            .filter_map(|s| s.last())
            .max()
            .map_or(0, |&p| p as usize + 1);
        // Counting sort by pod: counts, prefix sums, then the positions in subject order, so
        // each pod's run comes out sorted.
        let mut start = vec![0u32; pods + 1];
        for &pod in subjects.iter().flat_map(|s| s.iter()) {
            start[pod as usize + 1] += 1;
        }
        for i in 1..start.len() {
            start[i] += start[i - 1];
        }
        let mut next: Vec<u32> = start[..pods].to_vec();
        let mut positions = vec![0u32; start[pods] as usize];
        for (i, subject) in subjects.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            for &pod in subject.iter() {
                let slot = &mut next[pod as usize];
                positions[*slot as usize] = i;
                *slot += 1;
            }
        }
        Self { start, positions }
    }

    /// The positions of the subjects selecting `pod`, ascending.
    pub fn of(&self, pod: PodIdx) -> &[u32] {
        let pod = pod as usize;
        match (self.start.get(pod), self.start.get(pod + 1)) {
            (Some(&first), Some(&end)) => &self.positions[first as usize..end as usize],
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn each_pod_lists_the_subjects_selecting_it_in_order() {
        let index = SubjectIndex::new(&[&[1, 3], &[], &[0, 3, 7], &[3]]);
        assert_eq!(index.of(0), &[2]);
        assert_eq!(index.of(1), &[0]);
        assert_eq!(index.of(2), &[] as &[u32]);
        assert_eq!(index.of(3), &[0, 2, 3]);
        assert_eq!(index.of(7), &[2]);
        assert_eq!(index.of(8), &[] as &[u32], "beyond every subject");
        assert_eq!(SubjectIndex::new(&[]).of(0), &[] as &[u32]);
    }

    proptest! {
        /// The index answers as testing every subject for the pod would.
        #[test]
        fn index_agrees_with_testing_every_subject(
            subjects in proptest::collection::vec(
                proptest::collection::btree_set(0u32..40, 0..12), 0..10),
        ) {
            let lists: Vec<Vec<PodIdx>> =
                subjects.iter().map(|s| s.iter().copied().collect()).collect();
            let slices: Vec<&[PodIdx]> = lists.iter().map(Vec::as_slice).collect();
            let index = SubjectIndex::new(&slices);
            for pod in 0..45 {
                let naive: Vec<u32> = (0..lists.len() as u32)
                    .filter(|&i| lists[i as usize].binary_search(&pod).is_ok())
                    .collect();
                prop_assert_eq!(index.of(pod), &naive[..]);
            }
        }
    }
}
