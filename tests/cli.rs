//! The `dgpo` binary as a user runs it: dry runs, config errors, device errors.

use std::path::Path;
use std::process::Command;

fn dgpo(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dgpo"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn dry_run_prints_config_and_plan_with_parameter_counts() {
    let (code, out, err) = dgpo(&[
        "train",
        "--config",
        "configs/geneval.toml",
        "--set",
        "model.pretrained=tests/fixtures/parity/sd35_medium",
        "--set",
        "lora.rank=4",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rank = 4"), "{out}");
    assert!(
        out.contains("128 images = 8 groups × group_size 16"),
        "{out}"
    );
    assert!(out.contains("optimizer steps 1 per epoch"), "{out}");
    assert!(out.contains("trainable (LoRA r = 4)"), "{out}");
    assert!(out.contains("memory (rough)"), "{out}");
}

#[test]
fn dry_run_without_local_weights_says_what_is_unknown() {
    let (code, out, err) = dgpo(&[
        "train",
        "-c",
        "configs/pickscore.toml",
        "--dry-run",
        "--set",
        "model.pretrained=/nonexistent/model",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not found locally"), "{out}");
}

#[test]
fn misspelt_key_fails_with_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("dgpo-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, "[train]\nbeta_dpo = 10.0\nbeta_kll = 0.1\n").unwrap();
    let (code, _, err) = dgpo(&["train", "--config", f.to_str().unwrap(), "--dry-run"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("bad.toml") && err.contains("line 3") && err.contains("beta_kll"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn invalid_values_are_all_explained() {
    let (code, _, err) = dgpo(&[
        "train",
        "-c",
        "configs/geneval.toml",
        "--dry-run",
        "--set",
        "sample.batch_size=12",
        "--set",
        "train.clip_range=2",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("sample.group_size = 16 does not divide sample.batch_size = 12"),
        "{err}"
    );
    assert!(
        err.contains("train.clip_range = 2 must be in [0, 1)"),
        "{err}"
    );
}

#[test]
fn missing_config_file_and_bad_device_are_clear() {
    let (code, _, err) = dgpo(&["train", "-c", "configs/nope.toml", "--dry-run"]);
    assert_eq!(code, 1);
    assert!(err.contains("configs/nope.toml"), "{err}");
    let (code, _, err) = dgpo(&[
        "--device",
        "gpu0",
        "train",
        "-c",
        "configs/geneval.toml",
        "--dry-run",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
    let (code, _, err) = dgpo(&[
        "--cuda-single-stream",
        "train",
        "-c",
        "configs/geneval.toml",
        "--dry-run",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("--cuda-single-stream needs --device cuda"),
        "{err}"
    );
}

#[test]
fn help_shows_an_example_per_command() {
    for cmd in [
        "train",
        "sample",
        "export",
        "pretrain",
        "eval",
        "reward-server",
    ] {
        let (code, out, _) = dgpo(&[cmd, "--help"]);
        assert_eq!(code, 0);
        let first = match cmd {
            "export" => "--checkpoint",
            "reward-server" => "--reward",
            _ => "--config",
        };
        assert!(
            out.contains("Example") && out.contains(&format!("dgpo {cmd} {first}")),
            "{cmd}: {out}"
        );
    }
    assert!(Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/geneval.toml")
        .exists());
}

#[test]
fn dry_run_finds_a_hub_model_in_the_local_cache_without_network() {
    // The Hugging Face cache layout: hub/models--org--name/{refs/main, snapshots/<rev>/...}.
    let home = std::env::temp_dir().join(format!("dgpo-hf-{}", std::process::id()));
    let repo = home.join("hub/models--acme--tiny-sd3");
    let snap = repo.join("snapshots/abc123/transformer");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123").unwrap();
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/parity/sd3/transformer/config.json"),
        snap.join("config.json"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dgpo"))
        .args([
            "train",
            "-c",
            "configs/geneval.toml",
            "--dry-run",
            "--set",
            "model.pretrained=acme/tiny-sd3",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    std::fs::remove_dir_all(&home).ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("snapshots/abc123/transformer/config.json"),
        "{stdout}"
    );
    assert!(stdout.contains("parameters"), "{stdout}");
}

#[test]
fn sample_ignores_training_rules_and_warns_once_without_rewards() {
    let out = std::env::temp_dir().join(format!("dgpo-cli-sample-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (code, _, err) = dgpo(&[
        "sample",
        "-c",
        "configs/shapes.toml",
        "--set",
        "train.trunc_steps=10",
        "--set",
        "reward=[]",
        "--prompt",
        "a photo of a red circle",
        "--images-per-prompt",
        "1",
        "--steps",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.join("grid.png").is_file(), "{err}");
    assert_eq!(err.matches("no reward scores").count(), 1, "{err}");
    assert!(err.contains("no [[reward]] in the config"), "{err}");
    assert!(!err.contains("GenEval metadata"), "{err}");
    let _ = std::fs::remove_dir_all(&out);
}
