//! The SD3 pipeline against diffusers on a tiny random `StableDiffusion3Pipeline` in the real folder
//! layout (`scripts/make_sd3_pipeline_fixtures.py`): token ids of the three tokenizers (one built from
//! vocab.json + merges.txt), `encode_prompt`'s embeddings and pooled vectors with and without T5
//! (prompts that every tokenizer truncates included), the VAE decode, and whole images sampled from
//! the same noise.

mod common;

use candle_core::{DType, Device, Tensor};
use dgpo::pipeline::sd3::text::Sd3TextEncoders;
use std::collections::HashMap;
use std::path::PathBuf;

fn fx() -> PathBuf {
    common::tiny::root().join("tests/fixtures/sd3_pipeline")
}

/// What diffusers computed (`expected.safetensors`).
fn expected() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx().join("expected.safetensors"), &Device::Cpu).unwrap()
}

/// The prompts, token ids and T5 length (`expected.json`).
fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fx().join("expected.json")).unwrap()).unwrap()
}

/// The largest difference between two images' 8-bit values.
fn worst_pixel(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

fn prompts(meta: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(meta["prompts"].clone()).unwrap()
}

#[test]
fn prompt_embeddings_match_diffusers() {
    let dev = Device::Cpu;
    let e = expected();
    let meta = meta();
    let prompts = prompts(&meta);
    let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let max_len = meta["max_sequence_length"].as_u64().unwrap() as usize;
    let ids: HashMap<String, Vec<Vec<u32>>> =
        serde_json::from_value(meta["input_ids"].clone()).unwrap();

    let enc = Sd3TextEncoders::load(&fx(), max_len, true, DType::F32, &dev).unwrap();
    assert_eq!(enc.clip_l.ids(&p).unwrap(), ids["tokenizer"], "CLIP-L ids");
    assert_eq!(
        enc.clip_g.ids(&p).unwrap(),
        ids["tokenizer_2"],
        "CLIP-G ids (vocab.json + merges.txt, pad \"!\")"
    );
    assert_eq!(
        enc.t5.as_ref().unwrap().ids(&p).unwrap(),
        ids["tokenizer_3"],
        "T5 ids"
    );

    let (pe, pooled) = enc.encode(&p).unwrap();
    let (npe, npooled) = enc.encode(&["", "", ""]).unwrap();
    for (name, got, want) in [
        ("prompt_embeds", &pe, "prompt_embeds"),
        ("pooled", &pooled, "pooled"),
        ("negative_prompt_embeds", &npe, "negative_prompt_embeds"),
        ("negative_pooled", &npooled, "negative_pooled"),
    ] {
        let d = common::max_abs_diff(got, &e[want]);
        eprintln!("{name}: max abs diff {d:e}");
        assert!(d < 1e-4, "{name}: {d:e}");
    }

    let no_t5 = Sd3TextEncoders::load(&fx(), max_len, false, DType::F32, &dev).unwrap();
    let (pe0, pooled0) = no_t5.encode(&p).unwrap();
    let d = common::max_abs_diff(&pe0, &e["prompt_embeds_no_t5"]);
    let dp = common::max_abs_diff(&pooled0, &e["pooled_no_t5"]);
    eprintln!("without T5: prompt_embeds {d:e}, pooled {dp:e}");
    assert!(d < 1e-4 && dp < 1e-4, "{d:e} {dp:e}");
}

#[test]
fn a_missing_component_is_named() {
    let dir = common::tiny::tmp("sd3-missing");
    let e = Sd3TextEncoders::load(&dir, 16, true, DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("no transformer/ folder"), "{e:#}");
}

#[test]
fn vae_decodes_as_diffusers_in_chunks() {
    let dev = Device::Cpu;
    let e = expected();
    // Two latents with the default chunking (one at a time: Candle 0.11's KL decoder gives the
    // second latent of a batch wrong values, 0.4 off here).
    let vae = dgpo::pipeline::sd3::vae::Sd3Vae::load(&fx().join("vae"), DType::F32, &dev).unwrap();
    let dec = vae.decode(&e["vae_latents"]).unwrap();
    let d = common::max_abs_diff(&dec, &e["vae_decoded"]);
    eprintln!("VAE decode: max abs diff {d:e}");
    assert!(d < 1e-4, "{d:e}");
    let imgs = vae.decode_images(&e["vae_latents"]).unwrap();
    let want = e["vae_image_u8"]
        .permute((0, 2, 3, 1))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got: Vec<f32> = imgs
        .iter()
        .flat_map(|i| i.data.iter().map(|&p| p as f32))
        .collect();
    let worst = worst_pixel(&got, &want);
    eprintln!("VAE images: max pixel diff {worst}");
    assert!(worst <= 1.0, "{worst}");
    // Encode: the latent mean (diffusers' latent_dist.mode()) of the decoded images, two at once.
    let mean = vae.encode_mean(&e["vae_decoded"]).unwrap();
    let d = common::max_abs_diff(&mean, &e["vae_encoded_mean"]);
    eprintln!("VAE encode: max abs diff {d:e}");
    assert!(d < 1e-4, "{d:e}");
    // Scaled for the transformer, and back through decode: the decoder sees the same mean.
    let lat = vae.encode(&e["vae_decoded"]).unwrap();
    let c = &vae.config;
    let back = ((lat / c.scaling_factor).unwrap() + c.shift_factor.unwrap_or(0.0)).unwrap();
    assert!(common::max_abs_diff(&back, &mean) < 1e-5);
}

#[test]
fn the_whole_pipeline_makes_the_images_diffusers_makes() {
    let e = expected();
    let meta = meta();
    let prompts = prompts(&meta);
    let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let pipe = common::sd3_fixture_pipeline(16);
    let imgs = pipe
        .generate(
            &p,
            &e["sample_noise"],
            dgpo::config::Sampler::Euler,
            4,
            pipe.shift,
            4.5,
        )
        .unwrap();
    let want = e["sample_images_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let got: Vec<f32> = imgs
        .iter()
        .flat_map(|i| i.data.iter().map(|&p| p as f32))
        .collect();
    assert_eq!(got.len(), want.len());
    let worst = worst_pixel(&got, &want);
    let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    eprintln!(
        "end to end: max pixel diff {worst}/255, {differ} of {} values differ",
        got.len()
    );
    assert!(worst <= 2.0, "{worst}");
}

#[test]
fn dgpo_sample_with_the_noise_reproduces_the_diffusers_images() {
    let dev = Device::Cpu;
    let e = expected();
    let meta = meta();
    let prompts = prompts(&meta);
    let dir = common::tiny::tmp("sd3-sample");
    let noise = dir.join("noise.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("noise".to_string(), e["sample_noise"].clone())]),
        &noise,
    )
    .unwrap();
    let cfg = dgpo::config::Config::from_toml(
        &format!(
            "[model]\npretrained = \"{}\"\nresolution = 16\nmax_sequence_length = 16\n",
            fx().display()
        ),
        "sd3-sample",
        &[],
    )
    .unwrap();
    let out = dir.join("out");
    let mut a = dgpo::cli::sample::SampleArgs::from_config(&cfg, out.clone());
    a.prompts = prompts.clone();
    a.images_per_prompt = 1;
    a.noise = Some(noise);
    a.steps = 4;
    a.sampler = dgpo::config::Sampler::Euler;
    a.shift = 3.0;
    a.guidance = 4.5;
    a.batch_size = 2; // batches of 2 and 1
    dgpo::cli::sample::run(&cfg, &a, &dev).unwrap();
    let want = e["sample_images_u8"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut got = vec![];
    for k in 0..prompts.len() {
        let png = std::fs::read(out.join(format!("images/0/p{k:04}_i00.png"))).unwrap();
        got.extend(dgpo::image::Image::from_png_bytes(&png).unwrap().data);
    }
    assert_eq!(got.len(), want.len());
    let got: Vec<f32> = got.iter().map(|&p| p as f32).collect();
    let worst = worst_pixel(&got, &want);
    eprintln!("dgpo sample --noise: max pixel diff {worst}/255");
    assert!(worst <= 2.0, "{worst}");
    assert!(out.join("grid.png").exists() && out.join("summary.json").exists());
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

#[test]
fn a_repo_id_resolves_through_the_hugging_face_cache_offline() {
    // A cache in the hub's layout: hub/models--org--name/{refs/main, snapshots/<rev>/...}.
    let home = common::tiny::tmp("hf-home");
    let repo = home.join("hub/models--dgpo-test--tiny-sd3");
    copy_dir(&fx(), &repo.join("snapshots/0123abc"));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abc").unwrap();
    // SAFETY: no other test of this binary reads these variables.
    unsafe {
        std::env::set_var("HF_HOME", &home);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let dir = dgpo::hub::pipeline_dir("dgpo-test/tiny-sd3", true).unwrap();
    assert_eq!(dir, repo.join("snapshots/0123abc"));
    assert!(dgpo::hub::missing_pipeline_files(&dir, true).is_empty());
    // An incomplete snapshot and an absent repo say what to do.
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let e = format!(
        "{:#}",
        dgpo::hub::pipeline_dir("dgpo-test/tiny-sd3", true).unwrap_err()
    );
    assert!(
        e.contains("vae/diffusion_pytorch_model.safetensors")
            && e.contains("huggingface-cli download"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        dgpo::hub::pipeline_dir("dgpo-test/absent", true).unwrap_err()
    );
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}

#[test]
fn prompt_embeddings_are_cached_on_disk_per_prompt() {
    let e = expected();
    let meta = meta();
    let prompts = prompts(&meta);
    let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let root = common::tiny::tmp("embed-cache");
    let pipe = common::sd3_fixture_pipeline(16).with_cache(&root).unwrap();
    // A repeated prompt (as in a group) is encoded once; the first call fills the cache.
    let first = pipe.encode(&[p[0], p[1], p[0], p[2]]).unwrap();
    let entries =
        || common::safetensors_count(&root.read_dir().unwrap().next().unwrap().unwrap().path());
    assert_eq!(entries(), 3);
    let d = common::max_abs_diff(
        &Tensor::cat(
            &[
                first.context.narrow(0, 0, 2).unwrap(),
                first.context.narrow(0, 3, 1).unwrap(),
            ],
            0,
        )
        .unwrap(),
        &e["prompt_embeds"],
    );
    assert!(d < 1e-4, "{d:e}");
    // The second call is served from disk: same values, bit for bit.
    let again = pipe.encode(&[p[2], p[0]]).unwrap();
    assert_eq!(
        common::max_abs_diff(
            &again.context.narrow(0, 0, 1).unwrap(),
            &first.context.narrow(0, 3, 1).unwrap()
        ),
        0.0
    );
    assert_eq!(
        common::max_abs_diff(
            &again.pooled.narrow(0, 1, 1).unwrap(),
            &first.pooled.narrow(0, 0, 1).unwrap()
        ),
        0.0
    );
    assert_eq!(entries(), 3);
    // Another T5 length is another identity, so another folder.
    let other = common::sd3_fixture_pipeline(8).with_cache(&root).unwrap();
    other.encode(&[p[0]]).unwrap();
    assert_eq!(root.read_dir().unwrap().count(), 2);
}

#[test]
fn text_encoders_load_only_for_prompts_missing_from_the_cache_and_are_freed() {
    let dev = Device::Cpu;
    let e = expected();
    let prompts = prompts(&meta());
    let p: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let root = common::tiny::tmp("lazy-encoders");
    let load = || {
        dgpo::pipeline::sd3::Sd3Pipeline::load_cached(
            &fx(),
            &dgpo::model::Trainable::None,
            16,
            true,
            DType::F32,
            &dev,
            &root,
        )
        .unwrap()
    };
    let mut pipe = load();
    assert!(pipe.text.is_none(), "encoders stay on disk until needed");
    let err = format!("{:#}", pipe.encode(&[p[0]]).unwrap_err());
    assert!(err.contains("embedding cache"), "{err}");
    // Two distinct prompts (one repeated) and the empty one: encoded once each, in batches of 2.
    assert_eq!(pipe.prepare_prompts(&[p[0], p[1], p[0], ""], 2).unwrap(), 3);
    assert!(
        pipe.text.is_none(),
        "encoders freed after filling the cache"
    );
    let got = pipe.encode(&[p[1], p[0]]).unwrap();
    let want = e["prompt_embeds"].narrow(0, 0, 2).unwrap();
    let d = common::max_abs_diff(
        &Tensor::cat(
            &[
                got.context.narrow(0, 1, 1).unwrap(),
                got.context.narrow(0, 0, 1).unwrap(),
            ],
            0,
        )
        .unwrap(),
        &want,
    );
    assert!(d < 1e-4, "{d:e}");
    // A second pipeline finds everything in the cache: nothing to encode, nothing loaded.
    let mut again = load();
    assert_eq!(again.prepare_prompts(&[p[1], "", p[0]], 2).unwrap(), 0);
    assert!(again.text.is_none());
    // A pipeline loaded with its encoders keeps them.
    let mut eager = common::sd3_fixture_pipeline(16).with_cache(&root).unwrap();
    assert_eq!(eager.prepare_prompts(&[p[2]], 4).unwrap(), 1);
    assert!(eager.text.is_some());
    std::fs::remove_dir_all(&root).unwrap();
}
