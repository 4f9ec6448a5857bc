//! The prompts of an epoch: which training prompts form its groups (uniformly, or one tag after
//! another), each repeated `sample.group_size` times in a row, drawn from the epoch's seed.

use crate::config::PromptSampling;
use crate::geneval::Metadata;
use crate::prompt_file::PromptItem;
use crate::train::seeds::{epoch_rng, PROMPTS};
use rand::seq::SliceRandom;
use rand::Rng;

/// The prompt texts and metadata of an epoch's rollouts, group by group.
pub fn epoch_groups(
    items: &[PromptItem],
    sampling: PromptSampling,
    n_groups: usize,
    group_size: usize,
    seed: u64,
    epoch: usize,
) -> (Vec<String>, Vec<Option<Metadata>>) {
    let chosen = match sampling {
        PromptSampling::Uniform => epoch_prompts(items.len(), n_groups, seed, epoch),
        PromptSampling::ByTag => {
            let tags: Vec<&str> = items
                .iter()
                .map(|m| m.meta.as_ref().map_or("", |m| m.tag.as_str()))
                .collect();
            epoch_prompts_by_tag(&tags, n_groups, seed, epoch)
        }
    };
    let order: Vec<usize> = chosen
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p, group_size))
        .collect();
    let prompts = order.iter().map(|&i| items[i].prompt.clone()).collect();
    let metas = order.iter().map(|&i| items[i].meta.clone()).collect();
    (prompts, metas)
}

/// The prompts of one epoch: `n_groups` distinct training prompts (fewer if the file has fewer, then
/// repeated), each repeated `group_size` times consecutively.
pub fn epoch_prompts(n_train: usize, n_groups: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut r = epoch_rng(seed, epoch, PROMPTS);
    let mut out = Vec::with_capacity(n_groups);
    while out.len() < n_groups {
        let mut idx: Vec<usize> = (0..n_train).collect();
        idx.shuffle(&mut r);
        out.extend(idx.into_iter().take(n_groups - out.len()));
    }
    out
}

/// As [`epoch_prompts`] with `prompts.sampling = "by_tag"`: group `k` takes the `k`-th tag of a
/// random cycle over the distinct tags (first-seen order, reshuffled each cycle), then a prompt of
/// that tag uniformly at random. `tags[i]` is the tag of training prompt `i`.
pub fn epoch_prompts_by_tag(tags: &[&str], n_groups: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut r = epoch_rng(seed, epoch, PROMPTS);
    let mut names: Vec<&str> = Vec::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        match names.iter().position(|n| n == t) {
            Some(k) => members[k].push(i),
            None => {
                names.push(t);
                members.push(vec![i]);
            }
        }
    }
    let mut out = Vec::with_capacity(n_groups);
    while out.len() < n_groups && !names.is_empty() {
        let mut cycle: Vec<usize> = (0..names.len()).collect();
        cycle.shuffle(&mut r);
        for k in cycle.into_iter().take(n_groups - out.len()) {
            out.push(members[k][r.random_range(0..members[k].len())]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_tag_sampling_balances_tags_whatever_the_file_holds() {
        // 1 prompt of tag "a", 2 of "b", 97 of "c": uniform sampling would almost never pick "a".
        let mut tags = vec!["a", "b", "b"];
        tags.extend(std::iter::repeat_n("c", 97));
        let mut count = [0usize; 3];
        for epoch in 0..20 {
            let chosen = epoch_prompts_by_tag(&tags, 6, 7, epoch);
            assert_eq!(chosen.len(), 6);
            // every complete cycle of 3 groups holds each tag once
            for cycle in chosen.chunks(3) {
                let mut seen: Vec<&str> = cycle.iter().map(|&i| tags[i]).collect();
                seen.sort();
                assert_eq!(seen, ["a", "b", "c"]);
            }
            for &i in &chosen {
                count[(tags[i].as_bytes()[0] - b'a') as usize] += 1;
            }
        }
        assert_eq!(count, [40, 40, 40]);
        // deterministic in (seed, epoch), different across epochs
        assert_eq!(
            epoch_prompts_by_tag(&tags, 6, 7, 3),
            epoch_prompts_by_tag(&tags, 6, 7, 3)
        );
        assert_ne!(
            epoch_prompts_by_tag(&tags, 9, 7, 3),
            epoch_prompts_by_tag(&tags, 9, 7, 4)
        );
    }
}
