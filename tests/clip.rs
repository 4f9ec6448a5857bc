//! The CLIP-family rewards against transformers on tiny random CLIPs in the real file layouts
//! (`scripts/make_clip_fixtures.py`): tokenizer ids, the processor's 8-bit resize and crop (exact),
//! image and text embeddings, and the clip_score / pickscore / aesthetic values.

mod common;

use candle_core::{Device, Tensor};
use dgpo::clip::{load_tokenizer, tokenize, Clip, ClipProcessor};
use dgpo::config::RewardConfig;
use dgpo::image::Image;
use dgpo::reward::Rewards;
use std::collections::HashMap;
use std::path::PathBuf;

fn fx() -> PathBuf {
    common::tiny::root().join("tests/fixtures/clip")
}

fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx().join("expected.safetensors"), &Device::Cpu).unwrap()
}

fn images() -> Vec<Image> {
    (0..3)
        .map(|i| {
            Image::from_png_bytes(&std::fs::read(fx().join(format!("images/{i}.png"))).unwrap())
                .unwrap()
        })
        .collect()
}

fn meta() -> (Vec<String>, HashMap<String, Vec<Vec<u32>>>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx().join("expected.json")).unwrap())
            .unwrap();
    (
        serde_json::from_value(v["prompts"].clone()).unwrap(),
        serde_json::from_value(v["input_ids"].clone()).unwrap(),
    )
}

#[test]
fn preprocessing_matches_pil_bicubic_and_the_crop_exactly() {
    let all = expected()["pixels_u8"].clone();
    let proc = ClipProcessor::load(fx().join("gelu").to_str().unwrap()).unwrap();
    for (i, im) in images().iter().enumerate() {
        let got = proc.resize_crop(im).unwrap();
        assert_eq!((got.width, got.height), (224, 224));
        let want = all
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap();
        assert_eq!(got.data.len(), want.len());
        let bad = got.data.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(
            bad, 0,
            "image {i} ({}x{}): {bad} bytes differ",
            im.width, im.height
        );
    }
}

#[test]
fn embeddings_and_rewards_match_transformers() {
    let e = expected();
    let (prompts, ids) = meta();
    let dev = Device::Cpu;
    let ims = images();
    for act in ["gelu", "quick_gelu"] {
        let dir = fx().join(act);
        let d = dir.to_str().unwrap();
        let clip = Clip::load(d, &dev).unwrap();
        let tok = load_tokenizer(d, 77).unwrap();
        let got_ids = tokenize(&tok, &prompts).unwrap();
        assert_eq!(got_ids, ids[act], "{act}: token ids");
        let proc = ClipProcessor::load(d).unwrap();
        let img = clip
            .image_features(&proc.pixels(&ims, &dev).unwrap())
            .unwrap();
        let txt = clip.text_features(&got_ids).unwrap();
        let di = common::max_abs_diff(&img, &e[&format!("{act}.image_embeds")]);
        let dt = common::max_abs_diff(&txt, &e[&format!("{act}.text_embeds")]);
        eprintln!("{act}: max abs diff image embeds {di:e}, text embeds {dt:e}");
        assert!(di < 1e-4 && dt < 1e-4, "{act}: image {di:e}, text {dt:e}");
        for kind in ["clip_score", "pickscore", "aesthetic"] {
            let cfg = RewardConfig {
                kind: kind.into(),
                model: Some(d.into()),
                processor: Some(d.into()),
                head: (kind == "aesthetic")
                    .then(|| fx().join("aesthetic_head.pth").display().to_string()),
                batch_size: 2, // two batches of images and of prompts
                ..Default::default()
            };
            let r = Rewards::from_config(&[cfg]).unwrap();
            let (got, _) = r.score(&ims, &prompts, &[None, None, None]).unwrap();
            let got = Tensor::new(got, &dev).unwrap();
            let d = common::max_abs_diff(&got, &e[&format!("{act}.{kind}")]);
            eprintln!("{act} {kind}: max abs diff {d:e}");
            assert!(d < 1e-4, "{act} {kind}: {d:e}");
        }
    }
}

#[test]
fn bad_clip_inputs_are_named() {
    let missing = RewardConfig {
        kind: "pickscore".into(),
        model: Some("/nonexistent/clip".into()),
        ..Default::default()
    };
    let e = format!("{:#}", Rewards::from_config(&[missing]).err().unwrap());
    assert!(
        e.contains("/nonexistent/clip") && e.contains("pickscore"),
        "{e}"
    );
    let d = fx().join("gelu").display().to_string();
    let no_head = RewardConfig {
        kind: "aesthetic".into(),
        model: Some(d.clone()),
        ..Default::default()
    };
    let e = format!("{:#}", Rewards::from_config(&[no_head]).err().unwrap());
    assert!(e.contains("head ="), "{e}");
    // A head for another projection width.
    let dir = common::tiny::tmp("clip-head");
    let w = Tensor::zeros((1, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap();
    let p = dir.join("head.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([
            ("layers.0.weight".to_string(), w),
            ("layers.0.bias".to_string(), b),
        ]),
        &p,
    )
    .unwrap();
    let wrong = RewardConfig {
        kind: "aesthetic".into(),
        model: Some(d),
        head: Some(p.display().to_string()),
        ..Default::default()
    };
    let e = format!("{:#}", Rewards::from_config(&[wrong]).err().unwrap());
    assert!(e.contains("expected an input of 16"), "{e}");
}
