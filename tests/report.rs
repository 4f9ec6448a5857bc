//! Watching a run: the TensorBoard event file a short training writes (framing and CRCs, tags at
//! the expected steps, an image per evaluation, no duplicate steps after a resume), and the
//! report page drawn from the run folder.

mod common;

use candle_core::Device;
use common::tiny::{setup, tmp};
use dgpo::report::tfevents::{read_events, Event};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Every `(tag, step)` of a run's event files, with how often it occurs; and the image tags' steps.
fn events_of(run: &Path) -> (Vec<Event>, BTreeMap<(String, i64), usize>) {
    let files: Vec<_> = std::fs::read_dir(run.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one event file: {files:?}");
    assert!(files[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("events.out.tfevents."));
    let events = read_events(&files[0]).unwrap();
    let mut seen = BTreeMap::new();
    for e in &events {
        for v in e.summary.iter().flat_map(|s| &s.value) {
            *seen.entry((v.tag.clone(), e.step)).or_insert(0) += 1;
        }
    }
    (events, seen)
}

fn steps(seen: &BTreeMap<(String, i64), usize>, tag: &str) -> Vec<i64> {
    seen.keys()
        .filter(|(t, _)| t == tag)
        .map(|(_, s)| *s)
        .collect()
}

#[test]
fn training_writes_tensorboard_events_and_a_report_and_resume_keeps_steps_unique() {
    let dir = tmp("report");
    let cfg = setup(&dir);
    let dev = Device::Cpu;
    let a = dir.join("a");
    dgpo::train::run(&cfg, &a, false, &dev).unwrap();
    let (events, seen) = events_of(&a);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    // 3 epochs (optimizer steps 1..=3), evaluations before epochs 0 and 2 and after the last.
    for tag in [
        "train/reward_mean",
        "train/loss/policy",
        "train/kl",
        "train/clip_frac",
        "train/grad_norm",
    ] {
        assert_eq!(steps(&seen, tag), [1, 2, 3], "{tag}");
    }
    for tag in [
        "eval/geneval_overall",
        "eval/reward_mean",
        "eval/per_tag/position",
        "eval/grid",
    ] {
        assert_eq!(steps(&seen, tag), [0, 2, 3], "{tag}");
    }
    assert!(seen.keys().any(|(t, _)| t.starts_with("train/time/")));
    assert!(
        seen.values().all(|&n| n == 1),
        "a (tag, step) twice: {seen:?}"
    );
    // The images are the grids as PNG, with their sizes.
    let grids: Vec<_> = events
        .iter()
        .flat_map(|e| e.summary.iter().flat_map(|s| &s.value))
        .filter_map(|v| v.image.as_ref())
        .collect();
    assert_eq!(grids.len(), 3);
    for g in grids {
        assert_eq!(
            dgpo::report::png_size(&g.encoded_image_string),
            Some((g.width as u32, g.height as u32))
        );
    }
    // The values are the rows' values.
    let rows = dgpo::report::read_rows(&a.join("metrics.jsonl")).unwrap();
    let last_eval = rows.iter().rev().find(|r| r["kind"] == "eval").unwrap();
    let tb_last = events
        .iter()
        .rev()
        .flat_map(|e| e.summary.iter().flat_map(|s| &s.value))
        .find(|v| v.tag == "eval/geneval_overall")
        .unwrap();
    assert_eq!(
        tb_last.simple_value,
        Some(last_eval["geneval_overall"].as_f64().unwrap() as f32)
    );

    // report.html: written at each evaluation, with the curves, the grids and the config.
    let page = std::fs::read_to_string(a.join("report.html")).unwrap();
    for needle in [
        "eval/geneval_overall",
        "eval/per_tag/position",
        "train/loss/policy",
        "train/time/rollout_s",
        "<svg",
        "data:image/png;base64,",
        "epoch 0",
        "epoch 3",
        "[sample]",
    ] {
        assert!(page.contains(needle), "report.html lacks {needle:?}");
    }

    // Killed after epoch 1 (its events already written), resumed: each step once, as in `a`.
    let b = dir.join("b");
    dgpo::train::run_until(&cfg, &b, false, &dev, Some(1)).unwrap();
    dgpo::train::run(&cfg, &b, true, &dev).unwrap();
    let (_, seen_b) = events_of(&b);
    assert!(
        seen_b.values().all(|&n| n == 1),
        "duplicates after resume: {seen_b:?}"
    );
    let keys = |s: &BTreeMap<(String, i64), usize>| s.keys().cloned().collect::<BTreeSet<_>>();
    assert_eq!(keys(&seen), keys(&seen_b));

    // `dgpo report` overlays runs; switching TensorBoard off writes no event files.
    let out = dir.join("both.html");
    dgpo::report::cli(&[a.clone(), b.clone()], Some(out.clone()), None).unwrap();
    let both = std::fs::read_to_string(&out).unwrap();
    assert!(both.contains("Time to reach a GenEval score") && both.contains(">b<"));
    let mut quiet = cfg.clone();
    quiet.run.tensorboard = false;
    let c = dir.join("c");
    dgpo::train::run_until(&quiet, &c, false, &dev, Some(1)).unwrap();
    assert!(!c.join("tb").exists());
    let e = dgpo::report::cli(&[dir.join("nothing")], None, None).unwrap_err();
    assert!(format!("{e:#}").contains("run folder"), "{e:#}");
    std::fs::remove_dir_all(&dir).unwrap();
}
