//! What a caption says about each object it names, token by token: at each class word, that object's
//! colour and on which side of the other object it must be. The shapes text encoder adds an embedding
//! of these features to its output, so that its context arrives parsed, as SD3's T5 output does.

use crate::testbed::world::{CLASSES, COLORS, PLURALS};

/// Sides an object can be asked to be on, relative to the other object of a position caption.
pub const SIDES: [&str; 4] = ["left", "right", "above", "below"];

/// Parse features per token: one per side, then one per palette colour.
pub const PARSE_DIMS: usize = SIDES.len() + COLORS.len();

/// The side of the other object a relation word puts the object *after* the relation on.
fn inverse(side: usize) -> usize {
    side ^ 1
}

/// Per-token parse features of a caption given as its words (lower case, in order), in the shapes
/// tokenizer's layout (`[BOS]` then one token per word, `max_length` tokens in all, later words cut
/// off): at each class word a 1 for the colour word just before it, and in a position caption a 1 for
/// its side (the object before the relation word is on the relation's side — "left" in "a circle left
/// of a square" — the object after it on the opposite side); 0 everywhere else, including `[BOS]` and
/// padding.
pub fn parse_features<S: AsRef<str>>(words: &[S], max_length: usize) -> Vec<[f32; PARSE_DIMS]> {
    let words: Vec<&str> = words.iter().map(|w| w.as_ref()).collect();
    let mut out = vec![[0f32; PARSE_DIMS]; max_length];
    let relation = words
        .iter()
        .enumerate()
        .find_map(|(i, w)| SIDES.iter().position(|s| s == w).map(|s| (i, s)));
    for (i, w) in words.iter().enumerate() {
        let token = i + 1;
        if token >= max_length || !(CLASSES.contains(w) || PLURALS.contains(w)) {
            continue;
        }
        if let Some(c) = i
            .checked_sub(1)
            .and_then(|j| COLORS.iter().position(|(n, _)| *n == words[j]))
        {
            out[token][SIDES.len() + c] = 1.0;
        }
        if let Some((r, side)) = relation {
            out[token][if i < r { side } else { inverse(side) }] = 1.0;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(prompt: &str, max_length: usize) -> Vec<[f32; PARSE_DIMS]> {
        let words: Vec<&str> = prompt.split_whitespace().collect();
        parse_features(&words, max_length)
    }

    fn ones(v: &[f32; PARSE_DIMS]) -> Vec<usize> {
        (0..PARSE_DIMS).filter(|&k| v[k] == 1.0).collect()
    }

    #[test]
    fn class_words_get_their_colour_and_side() {
        let t = parse("a photo of a red circle left of a blue square", 16);
        // [BOS] a photo of a red circle left of a blue square
        //   0   1   2    3  4  5    6     7   8  9  10   11
        assert_eq!(ones(&t[6]), vec![0, SIDES.len()]);
        assert_eq!(ones(&t[11]), vec![1, SIDES.len() + 4]);
        for (i, v) in t.iter().enumerate() {
            if i != 6 && i != 11 {
                assert!(ones(v).is_empty(), "token {i}: {v:?}");
            }
        }
        let t = parse("a photo of a circle below a square", 16);
        assert_eq!(ones(&t[5]), vec![3]);
        assert_eq!(ones(&t[8]), vec![2]);
        let t = parse("a photo of three yellow triangles", 16);
        assert_eq!(ones(&t[6]), vec![SIDES.len() + 2]);
    }

    #[test]
    fn empty_and_truncated_captions() {
        assert!(parse("", 16).iter().all(|v| ones(v).is_empty()));
        let t = parse("a photo of a red circle left of a blue square", 8);
        assert_eq!(t.len(), 8);
        assert_eq!(ones(&t[6]), vec![0, SIDES.len()]);
    }
}
