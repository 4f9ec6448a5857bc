//! GenEval scoring: generic over a list of detections.
//!
//! This reproduces the scoring of the reference GenEval reward used by Flow-GRPO and by the DGPO
//! authors (`flow_grpo/gen_eval.py`, identical in both repositories; the detector and the CLIP colour
//! classifier are replaced by whatever produced the [`Detection`]s):
//!
//! * objects are grouped per class and ordered by confidence, highest first (ties keep input order);
//! * [`Outcome::correct`] is GenEval's official `evaluate` (at least `count` objects, colour and
//!   position checked on the `count` most confident ones, `exclude` clauses fail on `>= count`);
//! * [`Outcome::strict`] and [`Outcome::reward`] are the reference's `evaluate_reward` (exact counts,
//!   partial credit averaged over a list of terms; `exclude` is ignored there).
//!
//! Two details of the reference code that the paper's description does not spell out (the code wins):
//!
//! * the count term `1 − |n − found| / n` is not clamped, so it is negative when more than `2n`
//!   objects of the class are found (reward can be below 0);
//! * the position term: a clause whose target clause failed appends `0.0`; otherwise a relation that
//!   does not hold appends `0.0` **and** then `1.0` (the reference's `rewards.append(1.0)` sits after
//!   the loop over objects), while relations that all hold append a single `1.0`. A wrong position
//!   therefore costs less than the paper's "1 or 0" suggests: a position prompt with both objects
//!   found once but on the wrong side scores `[1, 1, 0, 1] → 3/4`, not `[1, 1, 0] → 2/3` (see the
//!   unit tests).
//!
//! Also, the official GenEval overall score is the mean over tags of the per-tag accuracy of
//! `correct` (GenEval's `summary_scores.py`); [`Summary::geneval_overall`] follows that, and
//! [`Summary::strict_overall`] is the same mean of the per-tag strict accuracies.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// GenEval's six tags, in the order of its reports.
pub const TAGS: [&str; 6] = [
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
];

/// The relations a `position` clause may ask for (image y grows downward).
pub const RELATIONS: [&str; 4] = ["left of", "right of", "above", "below"];

/// The reference's `POSITION_THRESHOLD`: each axis offset is reduced by this fraction of the sum of
/// the two boxes' sizes along that axis.
pub const POSITION_THRESHOLD: f64 = 0.1;

/// One line of a GenEval metadata file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub tag: String,
    pub include: Vec<Include>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<Exclude>,
    pub prompt: String,
}

/// "There are `count` objects of `class` (with `color`, `position` relative to another clause)."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Include {
    pub class: String,
    pub count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub color: Option<String>,
    /// `(relation, index of the target include clause)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<(String, usize)>,
}

/// "There are fewer than `count` objects of `class`."
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclude {
    pub class: String,
    pub count: u32,
}

impl Metadata {
    /// The checks [`parse_metadata_line`] applies after parsing.
    pub fn validate(&self) -> Result<()> {
        if !TAGS.contains(&self.tag.as_str()) {
            bail!(
                "unknown tag {:?} (expected one of {})",
                self.tag,
                TAGS.join(", ")
            );
        }
        if self.include.is_empty() {
            bail!("`include` is empty (expected at least one clause)");
        }
        for (i, inc) in self.include.iter().enumerate() {
            if inc.count == 0 {
                bail!("include[{i}] ({}): count must be >= 1", inc.class);
            }
            if let Some((rel, target)) = &inc.position {
                if !RELATIONS.contains(&rel.as_str()) {
                    bail!(
                        "include[{i}] ({}): unknown relation {rel:?} (expected one of {})",
                        inc.class,
                        RELATIONS.join(", ")
                    );
                }
                if *target >= i {
                    bail!(
                        "include[{i}] ({}): position target index {target} must refer to an earlier clause (< {i})",
                        inc.class
                    );
                }
            }
        }
        for (i, exc) in self.exclude.iter().enumerate() {
            if exc.count == 0 {
                bail!("exclude[{i}] ({}): count must be >= 1", exc.class);
            }
        }
        Ok(())
    }
}

/// Parse and validate one JSON line of a metadata file.
pub fn parse_metadata_line(line: &str) -> Result<Metadata> {
    let meta: Metadata = serde_json::from_str(line).context(
        "expected a JSON object {\"tag\", \"include\": [{\"class\", \"count\", \"color\"?, \"position\"?}], \"exclude\"?, \"prompt\"}",
    )?;
    meta.validate()?;
    Ok(meta)
}

/// Read a GenEval metadata file (JSON lines; blank lines are skipped).
pub fn read_metadata(path: &Path) -> Result<Vec<Metadata>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading GenEval metadata {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let meta = parse_metadata_line(line).with_context(|| {
            format!(
                "{}:{}: invalid GenEval metadata line",
                path.display(),
                i + 1
            )
        })?;
        out.push(meta);
    }
    Ok(out)
}

/// One metadata line in the style of GenEval's files (Python's `json.dumps`: `", "` and `": "`
/// separators, keys in the order tag, include (class, count, color?, position?), exclude?, prompt).
pub fn metadata_json_line(meta: &Metadata) -> String {
    struct PythonStyle;
    impl serde_json::ser::Formatter for PythonStyle {
        fn begin_array_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
            first: bool,
        ) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                writer.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(
            &mut self,
            writer: &mut W,
        ) -> std::io::Result<()> {
            writer.write_all(b": ")
        }
    }
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, PythonStyle);
    meta.serialize(&mut ser)
        .expect("metadata always serializes");
    String::from_utf8(buf).expect("serde_json writes UTF-8")
}

/// Write metadata as JSON lines ([`metadata_json_line`]), atomically (temporary file + rename).
pub fn write_metadata(path: &Path, metas: &[Metadata]) -> Result<()> {
    let mut text = String::new();
    for m in metas {
        text.push_str(&metadata_json_line(m));
        text.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// One detected object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub class: String,
    /// `[x0, y0, x1, y1]` in pixels (y grows downward).
    pub bbox: [f32; 4],
    /// Colour name; `None` never matches a clause that asks for a colour.
    pub color: Option<String>,
    pub confidence: f32,
}

/// The verdict on one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The training reward (reference `evaluate_reward`): mean of the partial-credit terms.
    pub reward: f64,
    /// Every include clause holds exactly (reference `evaluate_reward`'s `correct`).
    pub strict: bool,
    /// GenEval's official verdict (reference `evaluate`).
    pub correct: bool,
    /// Why it failed, one reason per line ("" when both verdicts hold).
    pub reason: String,
}

/// Relations of box `a` relative to box `b` (reference `relative_position`), in the order of
/// [`RELATIONS`]. Empty when the centres are (nearly) equal after discounting
/// [`POSITION_THRESHOLD`] of the boxes' sizes.
pub fn relative_position(a: &[f32; 4], b: &[f32; 4]) -> Vec<&'static str> {
    let centre = |r: &[f32; 4]| {
        [
            (r[0] as f64 + r[2] as f64) / 2.0,
            (r[1] as f64 + r[3] as f64) / 2.0,
        ]
    };
    let dim = |r: &[f32; 4]| {
        [
            (r[2] as f64 - r[0] as f64).abs(),
            (r[3] as f64 - r[1] as f64).abs(),
        ]
    };
    let (ca, cb, da, db) = (centre(a), centre(b), dim(a), dim(b));
    let offset = [ca[0] - cb[0], ca[1] - cb[1]];
    let mut revised = [0.0; 2];
    for k in 0..2 {
        let m = (offset[k].abs() - POSITION_THRESHOLD * (da[k] + db[k])).max(0.0);
        revised[k] = m * sign(offset[k]);
    }
    if revised.iter().all(|r| r.abs() < 1e-3) {
        return Vec::new();
    }
    let norm = offset[0].hypot(offset[1]);
    let (dx, dy) = (revised[0] / norm, revised[1] / norm);
    let mut rels = Vec::new();
    if dx < -0.5 {
        rels.push("left of");
    }
    if dx > 0.5 {
        rels.push("right of");
    }
    if dy < -0.5 {
        rels.push("above");
    }
    if dy > 0.5 {
        rels.push("below");
    }
    rels
}

/// numpy's `sign`: 0 at 0.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Detections per class, most confident first (stable for equal confidences).
fn group(detections: &[Detection]) -> BTreeMap<&str, Vec<&Detection>> {
    let mut groups: BTreeMap<&str, Vec<&Detection>> = BTreeMap::new();
    for d in detections {
        groups.entry(d.class.as_str()).or_default().push(d);
    }
    for v in groups.values_mut() {
        v.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    }
    groups
}

fn color_count(objects: &[&Detection], color: &str) -> usize {
    objects
        .iter()
        .filter(|d| d.color.as_deref() == Some(color))
        .count()
}

fn color_summary(objects: &[&Detection]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for d in objects {
        *counts
            .entry(d.color.as_deref().unwrap_or("no colour"))
            .or_default() += 1;
    }
    counts
        .iter()
        .map(|(c, n)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// First failing relation of `found` objects relative to `targets`, as a reason.
fn position_failure(
    class: &str,
    rel: &str,
    found: &[&Detection],
    targets: &[&Detection],
) -> Option<String> {
    for obj in found {
        for target in targets {
            let rels = relative_position(&obj.bbox, &target.bbox);
            if !rels.contains(&rel) {
                let got = if rels.is_empty() {
                    "no relation to".to_string()
                } else {
                    rels.join(" and ")
                };
                return Some(format!("expected {class} {rel} target, found {got} target"));
            }
        }
    }
    None
}

/// GenEval's official `evaluate`: (correct, reasons).
fn evaluate(meta: &Metadata, groups: &BTreeMap<&str, Vec<&Detection>>) -> (bool, Vec<String>) {
    let mut correct = true;
    let mut reasons = Vec::new();
    let mut matched_groups: Vec<Option<Vec<&Detection>>> = Vec::new();
    for req in &meta.include {
        let n = req.count as usize;
        let all = groups
            .get(req.class.as_str())
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let found: Vec<&Detection> = all.iter().take(n).copied().collect();
        let mut matched = true;
        if found.len() < n {
            matched = false;
            reasons.push(format!(
                "expected {}>={n}, found {}",
                req.class,
                found.len()
            ));
        } else {
            if let Some(color) = &req.color {
                let k = color_count(&found, color);
                if k < n {
                    matched = false;
                    reasons.push(format!(
                        "expected {color} {}>={n}, found {k} {color}; and {}",
                        req.class,
                        color_summary(&found)
                    ));
                }
            }
            if let (Some((rel, target)), true) = (&req.position, matched) {
                match matched_groups.get(*target).and_then(Option::as_ref) {
                    None => {
                        matched = false;
                        reasons.push(format!("no target for {} to be {rel}", req.class));
                    }
                    Some(targets) => {
                        if let Some(r) = position_failure(&req.class, rel, &found, targets) {
                            matched = false;
                            reasons.push(r);
                        }
                    }
                }
            }
        }
        correct &= matched;
        matched_groups.push(matched.then_some(found));
    }
    for req in &meta.exclude {
        let k = groups.get(req.class.as_str()).map_or(0, Vec::len);
        if k >= req.count as usize {
            correct = false;
            reasons.push(format!("expected {}<{}, found {k}", req.class, req.count));
        }
    }
    (correct, reasons)
}

/// The reference's `evaluate_reward`: (strict, reward, reasons).
fn evaluate_reward(
    meta: &Metadata,
    groups: &BTreeMap<&str, Vec<&Detection>>,
) -> (bool, f64, Vec<String>) {
    let mut strict = true;
    let mut reasons = Vec::new();
    let mut rewards: Vec<f64> = Vec::new();
    let mut matched_groups: Vec<Option<Vec<&Detection>>> = Vec::new();
    for req in &meta.include {
        let n = req.count as usize;
        let found: Vec<&Detection> = groups.get(req.class.as_str()).cloned().unwrap_or_default();
        let mut matched = true;
        rewards.push(1.0 - (n as f64 - found.len() as f64).abs() / n as f64);
        if found.len() != n {
            matched = false;
            reasons.push(format!(
                "expected {}=={n}, found {}",
                req.class,
                found.len()
            ));
            if req.color.is_some() || req.position.is_some() {
                rewards.push(0.0);
            }
        } else {
            if let Some(color) = &req.color {
                let k = color_count(&found, color);
                rewards.push(1.0 - (n as f64 - k as f64).abs() / n as f64);
                if k != n {
                    matched = false;
                    reasons.push(format!(
                        "expected {color} {}=={n}, found {k} {color}; and {}",
                        req.class,
                        color_summary(&found)
                    ));
                }
            }
            if let (Some((rel, target)), true) = (&req.position, matched) {
                match matched_groups.get(*target).and_then(Option::as_ref) {
                    None => {
                        matched = false;
                        reasons.push(format!("no target for {} to be {rel}", req.class));
                        rewards.push(0.0);
                    }
                    Some(targets) => {
                        if let Some(r) = position_failure(&req.class, rel, &found, targets) {
                            matched = false;
                            reasons.push(r);
                            rewards.push(0.0);
                        }
                        // The reference appends 1.0 after its loop whether or not a relation failed.
                        rewards.push(1.0);
                    }
                }
            }
        }
        strict &= matched;
        matched_groups.push(matched.then_some(found));
    }
    let reward = if rewards.is_empty() {
        0.0
    } else {
        rewards.iter().sum::<f64>() / rewards.len() as f64
    };
    (strict, reward, reasons)
}

/// Score one image's detections against its prompt's metadata.
///
/// A position clause whose target index is not an earlier clause (only possible for metadata that
/// bypassed [`Metadata::validate`]) is treated as "no target".
pub fn score(meta: &Metadata, detections: &[Detection]) -> Outcome {
    let groups = group(detections);
    let (strict, reward, mut reasons) = evaluate_reward(meta, &groups);
    let (correct, official) = evaluate(meta, &groups);
    // The official verdict's reasons that the strict pass did not already give (exclude clauses,
    // mostly).
    for r in official {
        if !reasons.contains(&r) {
            reasons.push(r);
        }
    }
    Outcome {
        reward,
        strict,
        correct,
        reason: reasons.join("\n"),
    }
}

/// Aggregates over the images of one tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TagStats {
    pub n: usize,
    pub strict_accuracy: f64,
    pub accuracy: f64,
    pub reward_mean: f64,
}

/// Aggregates over an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub per_tag: BTreeMap<String, TagStats>,
    /// GenEval's score: mean over the tags present of the per-tag [`TagStats::accuracy`]
    /// (official `correct`, as GenEval's `summary_scores.py` reports it).
    pub geneval_overall: f64,
    /// The same mean over tags of the per-tag [`TagStats::strict_accuracy`].
    pub strict_overall: f64,
    /// Over all images (not per tag).
    pub strict_accuracy: f64,
    pub accuracy: f64,
    pub reward_mean: f64,
    pub n: usize,
}

/// Aggregate per tag and overall.
pub fn summarize<'a>(items: impl IntoIterator<Item = (&'a Metadata, &'a Outcome)>) -> Summary {
    #[derive(Default)]
    struct Acc {
        n: usize,
        strict: f64,
        correct: f64,
        reward: f64,
    }
    impl Acc {
        fn add(&mut self, o: &Outcome) {
            self.n += 1;
            self.strict += f64::from(u8::from(o.strict));
            self.correct += f64::from(u8::from(o.correct));
            self.reward += o.reward;
        }
        fn stats(&self) -> TagStats {
            let d = self.n.max(1) as f64;
            TagStats {
                n: self.n,
                strict_accuracy: self.strict / d,
                accuracy: self.correct / d,
                reward_mean: self.reward / d,
            }
        }
    }
    let mut per: BTreeMap<String, Acc> = BTreeMap::new();
    let mut all = Acc::default();
    for (meta, outcome) in items {
        per.entry(meta.tag.clone()).or_default().add(outcome);
        all.add(outcome);
    }
    let per_tag: BTreeMap<String, TagStats> =
        per.iter().map(|(k, v)| (k.clone(), v.stats())).collect();
    let tags = per_tag.len().max(1) as f64;
    let total = all.stats();
    Summary {
        geneval_overall: per_tag.values().map(|s| s.accuracy).sum::<f64>() / tags,
        strict_overall: per_tag.values().map(|s| s.strict_accuracy).sum::<f64>() / tags,
        per_tag,
        strict_accuracy: total.strict_accuracy,
        accuracy: total.accuracy,
        reward_mean: total.reward_mean,
        n: total.n,
    }
}

impl Summary {
    /// Aligned table: one row per tag (GenEval's order first, unknown tags after), then the mean
    /// over tags (GenEval's overall score) and the totals over all images.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<14} {:>6} {:>11} {:>12} {:>11}",
            "tag", "n", "strict acc", "geneval acc", "mean reward"
        );
        let mut row = |name: &str, n: usize, strict: f64, acc: f64, reward: f64| {
            let _ = writeln!(
                s,
                "{name:<14} {n:>6} {strict:>11.4} {acc:>12.4} {reward:>11.4}"
            );
        };
        let ordered = TAGS
            .iter()
            .filter_map(|t| self.per_tag.get_key_value(*t))
            .chain(
                self.per_tag
                    .iter()
                    .filter(|(k, _)| !TAGS.contains(&k.as_str())),
            );
        for (tag, st) in ordered {
            row(tag, st.n, st.strict_accuracy, st.accuracy, st.reward_mean);
        }
        let tag_reward = self.per_tag.values().map(|s| s.reward_mean).sum::<f64>()
            / self.per_tag.len().max(1) as f64;
        row(
            "mean of tags",
            self.n,
            self.strict_overall,
            self.geneval_overall,
            tag_reward,
        );
        row(
            "all images",
            self.n,
            self.strict_accuracy,
            self.accuracy,
            self.reward_mean,
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class: &str, bbox: [f32; 4], color: Option<&str>, confidence: f32) -> Detection {
        Detection {
            class: class.into(),
            bbox,
            color: color.map(Into::into),
            confidence,
        }
    }

    fn meta(json: &str) -> Metadata {
        parse_metadata_line(json).unwrap()
    }

    const POS: &str = r#"{"tag": "position", "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}], "prompt": "a photo of a circle left of a square"}"#;

    #[test]
    fn relative_position_by_hand() {
        // a centred at (5,5), b at (25,5); both 10 wide: |dx| = 20 − 0.1·20 = 18, dy = 0 → dx = −18/20.
        let a = [0.0, 0.0, 10.0, 10.0];
        let b = [20.0, 0.0, 30.0, 10.0];
        assert_eq!(relative_position(&a, &b), vec!["left of"]);
        assert_eq!(relative_position(&b, &a), vec!["right of"]);
        // Diagonal at 45°: offset (10,10), revised (8,8), norm 14.14 → 0.566 > 0.5 on both axes.
        let c = [10.0, 10.0, 20.0, 20.0];
        assert_eq!(relative_position(&c, &a), vec!["right of", "below"]);
        assert_eq!(relative_position(&a, &c), vec!["left of", "above"]);
        // Offset (10,12): dx = 8/15.62 = 0.512 > 0.5, dy = 10/15.62 = 0.640.
        let d = [10.0, 12.0, 20.0, 22.0];
        assert_eq!(relative_position(&d, &a), vec!["right of", "below"]);
        // Offset (6,14): dx = 4/15.23 = 0.263 (no horizontal relation), dy = 12/15.23 = 0.788.
        let e = [6.0, 14.0, 16.0, 24.0];
        assert_eq!(relative_position(&e, &a), vec!["below"]);
        // Offset (1.5, 0) with 10-wide boxes: revised max(1.5 − 2, 0) = 0 → no relation at all.
        let f = [1.5, 0.0, 11.5, 10.0];
        assert!(relative_position(&f, &a).is_empty());
        // Same centre → empty (no division by zero).
        assert!(relative_position(&a, &a).is_empty());
    }

    #[test]
    fn metadata_round_trip_and_validation() {
        let m = meta(POS);
        assert_eq!(m.include[1].position, Some(("left of".into(), 0)));
        let back = serde_json::to_string(&m).unwrap();
        assert_eq!(parse_metadata_line(&back).unwrap(), m);
        assert!(!back.contains("exclude") && !back.contains("color"));
        let bad = [
            (
                r#"{"tag": "nope", "include": [{"class": "a", "count": 1}], "prompt": "p"}"#,
                "unknown tag",
            ),
            (
                r#"{"tag": "counting", "include": [{"class": "a", "count": 0}], "prompt": "p"}"#,
                "count must be >= 1",
            ),
            (
                r#"{"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}], "prompt": "p"}"#,
                "unknown relation",
            ),
            (
                r#"{"tag": "position", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["above", 1]}], "prompt": "p"}"#,
                "earlier clause",
            ),
            (
                r#"{"tag": "colors", "include": [{"class": "a", "count": 1, "colour": "red"}], "prompt": "p"}"#,
                "colour",
            ),
            (
                r#"{"tag": "colors", "include": [], "prompt": "p"}"#,
                "empty",
            ),
            (r#"{"tag": "colors", "prompt": "p"}"#, "include"),
        ];
        for (line, want) in bad {
            let err = format!("{:#}", parse_metadata_line(line).unwrap_err());
            assert!(err.contains(want), "{line}: {err}");
        }
    }

    #[test]
    fn json_line_in_genevals_style() {
        let line = r#"{"tag": "counting", "include": [{"class": "wine glass", "count": 2}], "exclude": [{"class": "wine glass", "count": 3}], "prompt": "a photo of two wine glasses"}"#;
        assert_eq!(metadata_json_line(&meta(line)), line);
        assert_eq!(metadata_json_line(&meta(POS)), POS);
    }

    #[test]
    fn counting_rewards() {
        let m = meta(
            r#"{"tag": "counting", "include": [{"class": "circle", "count": 3}], "exclude": [{"class": "circle", "count": 4}], "prompt": "a photo of three circles"}"#,
        );
        let c = |x: f32| det("circle", [x, 0.0, x + 5.0, 5.0], Some("red"), 0.9);
        // Exactly three: [1] → 1.
        let o = score(&m, &[c(0.0), c(10.0), c(20.0)]);
        assert!(o.strict && o.correct && o.reward == 1.0, "{o:?}");
        // Two: [1 − 1/3] → 2/3, both verdicts fail.
        let o = score(&m, &[c(0.0), c(10.0)]);
        assert!(!o.strict && !o.correct);
        assert!((o.reward - 2.0 / 3.0).abs() < 1e-12);
        // Four: [1 − 1/3] → 2/3; official fails through the exclude clause (4 >= 4).
        let o = score(&m, &[c(0.0), c(10.0), c(20.0), c(26.0)]);
        assert!(!o.strict && !o.correct);
        assert!((o.reward - 2.0 / 3.0).abs() < 1e-12);
        assert!(o.reason.contains("circle<4"), "{}", o.reason);
        // Seven: [1 − 4/3] → −1/3 (the reference does not clamp).
        let many: Vec<_> = (0..7).map(|i| c(i as f32 * 4.0)).collect();
        assert!((score(&m, &many).reward + 1.0 / 3.0).abs() < 1e-12);
        // None: [0].
        assert_eq!(score(&m, &[]).reward, 0.0);
    }

    #[test]
    fn single_object_extra_objects() {
        let m = meta(
            r#"{"tag": "single_object", "include": [{"class": "square", "count": 1}], "prompt": "a photo of a square"}"#,
        );
        let s = |x: f32, conf: f32| det("square", [x, 0.0, x + 5.0, 5.0], None, conf);
        // Two squares: strict fails ([1 − 1/1] = 0), the official `>=` verdict holds.
        let o = score(&m, &[s(0.0, 0.9), s(10.0, 0.5)]);
        assert!(!o.strict && o.correct && o.reward == 0.0, "{o:?}");
        // Other classes do not matter.
        let o = score(
            &m,
            &[
                s(0.0, 0.9),
                det("circle", [20.0, 0.0, 25.0, 5.0], None, 1.0),
            ],
        );
        assert!(o.strict && o.correct && o.reward == 1.0);
    }

    #[test]
    fn color_attr_rewards() {
        let m = meta(
            r#"{"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}], "prompt": "a photo of a red circle and a blue square"}"#,
        );
        let circle = |c: Option<&str>| det("circle", [0.0, 0.0, 8.0, 8.0], c, 0.9);
        let square = |c: Option<&str>| det("square", [20.0, 0.0, 28.0, 8.0], c, 0.9);
        let o = score(&m, &[circle(Some("red")), square(Some("blue"))]);
        assert!(o.strict && o.correct && o.reward == 1.0);
        // Wrong colour on the square: [1, 1, 1, 0] → 3/4.
        let o = score(&m, &[circle(Some("red")), square(Some("green"))]);
        assert!(!o.strict && !o.correct);
        assert_eq!(o.reward, 0.75);
        // Colour unknown counts as not matching: same 3/4.
        assert_eq!(score(&m, &[circle(Some("red")), square(None)]).reward, 0.75);
        // Square missing: [1, 1, 0, 0(count wrong + colour clause)] → 1/2.
        let o = score(&m, &[circle(Some("red"))]);
        assert_eq!(o.reward, 0.5);
        // Two red circles: count term 0, plus 0 for the colour clause; square fine: [0, 0, 1, 1] → 1/2.
        // The official verdict takes the most confident circle, which is red: correct.
        let o = score(
            &m,
            &[
                circle(Some("red")),
                circle(Some("green")),
                square(Some("blue")),
            ],
        );
        assert!(!o.strict && o.correct);
        assert_eq!(o.reward, 0.5);
        // ... but if the green one is more confident, the official verdict fails too.
        let mut green = circle(Some("green"));
        green.confidence = 0.95;
        let o = score(&m, &[circle(Some("red")), green, square(Some("blue"))]);
        assert!(!o.strict && !o.correct);
    }

    #[test]
    fn colors_partial_colour_term() {
        // Not a GenEval prompt (colour with count 2) but the formula is generic: two circles, one
        // red: [1, 1 − 1/2] → 3/4.
        let m = meta(
            r#"{"tag": "colors", "include": [{"class": "circle", "count": 2, "color": "red"}], "prompt": "p"}"#,
        );
        let o = score(
            &m,
            &[
                det("circle", [0.0, 0.0, 5.0, 5.0], Some("red"), 0.9),
                det("circle", [9.0, 0.0, 14.0, 5.0], Some("blue"), 0.8),
            ],
        );
        assert!(!o.strict && !o.correct);
        assert_eq!(o.reward, 0.75);
    }

    #[test]
    fn position_rewards() {
        let m = meta(POS);
        let square = det("square", [20.0, 10.0, 30.0, 20.0], Some("red"), 0.9);
        let left = det("circle", [0.0, 10.0, 10.0, 20.0], Some("blue"), 0.9);
        // Centre (27,3) vs (25,15): revised offset (0, −10.4) → "above" only.
        let right = det("circle", [22.0, 0.0, 32.0, 6.0], Some("blue"), 0.9);
        // Correct: [1 (square count), 1 (circle count), 1 (position)] → 1.
        let o = score(&m, &[square.clone(), left.clone()]);
        assert!(o.strict && o.correct && o.reward == 1.0, "{o:?}");
        // Wrong place: the reference appends 0.0 and then 1.0: [1, 1, 0, 1] → 3/4.
        let o = score(&m, &[square.clone(), right]);
        assert!(!o.strict && !o.correct);
        assert_eq!(o.reward, 0.75);
        assert!(
            o.reason.contains("expected circle left of target"),
            "{}",
            o.reason
        );
        // Target missing: [0 (square count), 1 (circle count), 0 (no target)] → 1/3.
        let o = score(&m, std::slice::from_ref(&left));
        assert!(!o.strict && !o.correct);
        assert!((o.reward - 1.0 / 3.0).abs() < 1e-12);
        assert!(o.reason.contains("no target for circle"), "{}", o.reason);
        // Circle missing: [1, 0, 0 (count wrong on a position clause)] → 1/3.
        let o = score(&m, std::slice::from_ref(&square));
        assert!((o.reward - 1.0 / 3.0).abs() < 1e-12);
        // Two squares, circle left of both: strict count fails on the target ([0, 1, 0]) → 1/3;
        // the official verdict holds (the most confident square is the target).
        let far = det("square", [20.0, 22.0, 30.0, 32.0], None, 0.5);
        let o = score(&m, &[square, far, left]);
        assert!(!o.strict && o.correct);
        assert!((o.reward - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn exclude_only_affects_official_verdict() {
        let m = meta(
            r#"{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "exclude": [{"class": "square", "count": 1}], "prompt": "p"}"#,
        );
        let o = score(
            &m,
            &[
                det("circle", [0.0, 0.0, 5.0, 5.0], None, 0.9),
                det("square", [9.0, 0.0, 14.0, 5.0], None, 0.9),
            ],
        );
        assert!(o.strict && !o.correct && o.reward == 1.0, "{o:?}");
        assert_eq!(o.reason, "expected square<1, found 1");
    }

    #[test]
    fn summary_means() {
        let single = meta(
            r#"{"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a"}"#,
        );
        let count = meta(
            r#"{"tag": "counting", "include": [{"class": "circle", "count": 2}], "prompt": "b"}"#,
        );
        let out = |strict: bool, correct: bool, reward: f64| Outcome {
            reward,
            strict,
            correct,
            reason: String::new(),
        };
        let outcomes = [
            out(true, true, 1.0),
            out(false, true, 0.0),
            out(false, false, 0.5),
        ];
        let metas = [&single, &single, &count];
        let s = summarize(metas.iter().copied().zip(outcomes.iter()));
        assert_eq!(s.n, 3);
        let so = &s.per_tag["single_object"];
        assert_eq!(
            (so.n, so.strict_accuracy, so.accuracy, so.reward_mean),
            (2, 0.5, 1.0, 0.5)
        );
        // Per-tag means: accuracy (1 + 0)/2, strict (0.5 + 0)/2.
        assert_eq!(s.geneval_overall, 0.5);
        assert_eq!(s.strict_overall, 0.25);
        assert!((s.strict_accuracy - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.accuracy - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.reward_mean, 0.5);
        let t = s.table();
        assert!(
            t.contains("single_object") && t.contains("counting") && t.contains("mean of tags")
        );
        let widths: Vec<usize> = t.lines().map(str::len).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{t}");
        // Empty input: zeros, no NaN.
        let e = summarize(std::iter::empty());
        assert_eq!((e.n, e.geneval_overall, e.reward_mean), (0, 0.0, 0.0));
    }
}
