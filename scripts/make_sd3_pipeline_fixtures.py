"""A tiny random StableDiffusion3Pipeline in diffusers' real folder layout, and the prompt embeddings
diffusers computes with it, for tests/sd3_pipeline.rs. Run by hand (needs torch, diffusers, transformers):

    /tmp/pt/bin/python scripts/make_sd3_pipeline_fixtures.py tests/fixtures/sd3_pipeline

The pipeline: CLIP-L-like (quick_gelu, 3 layers, pad "<|endoftext|>") and CLIP-G-like (gelu, pad "!")
text encoders with projection, a T5 v1.1-like encoder (gated-gelu), their tokenizers (tokenizer/ keeps
tokenizer.json; tokenizer_2/ only vocab.json + merges.txt, as the SD3.5 repos ship it; tokenizer_3/ a
Unigram tokenizer.json), a tiny SD3 transformer, a 16-channel VAE and the scheduler.
expected.safetensors holds `StableDiffusion3Pipeline.encode_prompt` for the prompts of expected.json
(CFG on, negative prompt "", max_sequence_length 16), with T5 and with text_encoder_3 = None.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5TokenizerFast)

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/sd3_pipeline"
shutil.rmtree(out, ignore_errors=True)
torch.manual_seed(0)

PROMPTS = [
    "a photo of a red circle",
    "Two   BLUE squares, left of a green triangle!",
    # longer than 77 CLIP tokens (byte-level BPE with few merges) and 16 T5 tokens: both truncate
    "a very long prompt about a red circle and a blue square and a green triangle and many more "
    "shapes that goes on and on so that every tokenizer has to cut it somewhere",
]
MAX_T5 = 16


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer(folder, pad, keep_json):
    chars = bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "p h", "ph o",
              "pho t", "phot o</w>", "o f</w>", "b l", "bl u", "blu e</w>", "l e", "le f",
              "lef t</w>", "s q", "sq u"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/vocab.json", "w") as f:
        json.dump(vocab, f)
    with open(f"{folder}/merges.txt", "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", pad_token=pad,
                        model_max_length=77)
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        for f in os.listdir(d):
            if f != "tokenizer.json" or keep_json:
                shutil.copy(f"{d}/{f}", f"{folder}/{f}")
    return tok, len(vocab)


def t5_tokenizer(folder):
    words = ["a", "photo", "of", "red", "circle", "blue", "square", "s", "green", "triangle", "left",
             "two", "and", "long"]
    chars = "abcdefghijklmnopqrstuvwxyz,!"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [(c, -3.0 - 0.01 * i) for i, c in enumerate(chars)]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Sequence([normalizers.Replace(Regex(" {2,}"), " ")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                          extra_ids=0, model_max_length=512)
    tok.save_pretrained(folder)
    return tok, len(vocab)


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "layer_norm" in name):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))


work = tempfile.mkdtemp()
tok1, v1 = clip_tokenizer(f"{work}/tokenizer", "<|endoftext|>", keep_json=True)
tok2, v2 = clip_tokenizer(f"{work}/tokenizer_2", "!", keep_json=False)
tok3, v3 = t5_tokenizer(f"{work}/tokenizer_3")

clip_l = CLIPTextModelWithProjection(CLIPTextConfig(
    vocab_size=v1, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16, bos_token_id=v1 - 2,
    eos_token_id=2, pad_token_id=1)).eval()
clip_g = CLIPTextModelWithProjection(CLIPTextConfig(
    vocab_size=v2, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=24, bos_token_id=v2 - 2,
    eos_token_id=v2 - 1, pad_token_id=1)).eval()
t5 = T5EncoderModel(T5Config(
    vocab_size=v3, d_model=96, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    tie_word_embeddings=False)).eval()
transformer = SD3Transformer2DModel(
    sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=2, joint_attention_dim=96, caption_projection_dim=16,
    pooled_projection_dim=40, out_channels=16, pos_embed_max_size=8).eval()
vae = AutoencoderKL(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False).eval()
for m in (clip_l, clip_g, t5, transformer, vae):
    randomize(m)

pipe = StableDiffusion3Pipeline(
    transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
    text_encoder=clip_l, tokenizer=tok1, text_encoder_2=clip_g, tokenizer_2=tok2,
    text_encoder_3=t5, tokenizer_3=tok3)
pipe.save_pretrained(out)
# The tokenizers exactly as built above (save_pretrained may rewrite them): tokenizer_2 without
# tokenizer.json, as in the SD3.5 repos.
for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
    shutil.rmtree(f"{out}/{sub}", ignore_errors=True)
    shutil.copytree(f"{work}/{sub}", f"{out}/{sub}")

expected = {}
with torch.no_grad():
    pe, npe, pp, npp = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=True, negative_prompt=None, max_sequence_length=MAX_T5)
    expected.update(prompt_embeds=pe, negative_prompt_embeds=npe, pooled=pp, negative_pooled=npp)
    pipe.text_encoder_3 = None
    pe0, _, pp0, _ = pipe.encode_prompt(
        prompt=PROMPTS, prompt_2=None, prompt_3=None, device="cpu", num_images_per_prompt=1,
        do_classifier_free_guidance=False, max_sequence_length=MAX_T5)
    expected.update(prompt_embeds_no_t5=pe0, pooled_no_t5=pp0)
# The VAE: decode as the pipeline does (latents / scaling + shift, decode, (x / 2 + 0.5) clamped,
# uint8 by rounding), and the encoder's mean (the latent distribution's mode) of those images.
with torch.no_grad():
    lat = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    dec = vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
    img = (dec / 2 + 0.5).clamp(0, 1)
    expected.update(vae_latents=lat, vae_decoded=dec, vae_image=img,
                    vae_image_u8=(img * 255).round(),
                    vae_encoded_mean=vae.encode(dec).latent_dist.mode())
# End to end: the pipeline's own sampling (FlowMatchEulerDiscreteScheduler, shift 3, 4 steps, CFG 4.5)
# from given initial noise, to 16x16 images, with T5 back on.
pipe.text_encoder_3 = t5
noise = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2))
with torch.no_grad():
    imgs = pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=4, guidance_scale=4.5,
                max_sequence_length=MAX_T5, output_type="np").images
    lat = pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=4, guidance_scale=4.5,
               max_sequence_length=MAX_T5, output_type="latent").images
    print("scheduler sigmas", pipe.scheduler.sigmas.tolist(), "timesteps", pipe.scheduler.timesteps.tolist())
expected.update(sample_noise=noise, sample_images_u8=torch.from_numpy((imgs * 255).round()),
                sample_latents=lat)
ids = {
    "tokenizer": tok1(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"],
    "tokenizer_2": tok2(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"],
    "tokenizer_3": tok3(PROMPTS, padding="max_length", max_length=MAX_T5, truncation=True,
                        add_special_tokens=True)["input_ids"],
}
save_file({k: v.contiguous().float() for k, v in expected.items()}, f"{out}/expected.safetensors")
with open(f"{out}/expected.json", "w") as f:
    json.dump({"prompts": PROMPTS, "max_sequence_length": MAX_T5, "input_ids": ids}, f)
print("wrote", out, {k: tuple(v.shape) for k, v in expected.items()})
