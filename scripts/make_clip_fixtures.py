"""Tiny random CLIPs in transformers' real file layout, and what transformers computes with them, for
tests/clip.rs. Run by hand (needs torch, transformers, PIL):

    /tmp/pt/bin/python scripts/make_clip_fixtures.py tests/fixtures/clip

Writes, under the output folder:
  gelu/        CLIPModel with hidden_act "gelu" (as CLIP-H / PickScore), model.safetensors,
               tokenizer.json (a small byte-level BPE in CLIP's format), preprocessor_config.json
  quick_gelu/  the same with "quick_gelu" (as OpenAI's CLIP-L), weights as pytorch_model.bin
  aesthetic_head.pth   a random LAION-style MLP head (layers.0/2/4/6/7) over the projection
  images/*.png  three test images (32x32 upsampled, 300x200 and 80x48 downsampled)
  expected.safetensors  pixel values, embeddings and reward values; expected.json the prompts and ids
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/clip"
os.makedirs(f"{out}/images", exist_ok=True)
torch.manual_seed(0)
rng = np.random.default_rng(0)

PROMPTS = [
    "a photo of a red circle",
    "a photo of two blue squares left of a green triangle",
    "a sign that says \"hello\"",
]


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


def make_tokenizer(folder):
    chars = bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>",
              "p h", "ph o", "pho t", "phot o</w>", "o f</w>", "t w", "tw o</w>", "b l", "bl u",
              "blu e</w>", "l e", "le f", "lef t</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/vocab.json", "w") as f:
            json.dump(vocab, f)
        with open(f"{d}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt")
    tok.save_pretrained(folder)
    return tok, len(vocab)


def make_model(folder, act, safe):
    tok, vocab_size = make_tokenizer(folder)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act=act, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                         pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, image_size=224, patch_size=32, hidden_act=act),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a non-default scale
        for n, p in model.named_parameters():
            if "norm" in n or "layrnorm" in n:
                p.add_(0.1 * torch.randn_like(p))
        model.logit_scale.fill_(3.0)
    model.save_pretrained(folder)
    if not safe:  # the older PyTorch layout instead (e.g. PickScore_v1 ships pytorch_model.bin)
        for f in os.listdir(folder):
            if f.endswith(".safetensors"):
                os.remove(f"{folder}/{f}")
        torch.save(model.state_dict(), f"{folder}/pytorch_model.bin")
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    proc.save_pretrained(folder)
    return model, tok, proc


def pattern(h, w):
    """Structured, high-frequency and PNG-friendly."""
    y, x = np.indices((h, w))
    return np.stack([(x * 7 + y * 3) % 256, (x * y) % 256, ((x - y) ** 2) % 256], -1).astype(np.uint8)


images = [
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
    Image.fromarray(pattern(240, 300)),
    Image.fromarray(pattern(80, 48)),
]
for i, im in enumerate(images):
    im.save(f"{out}/images/{i}.png")

expected = {}
ids_out = {}
head = torch.nn.Sequential(
    torch.nn.Linear(16, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 8), torch.nn.Dropout(0.2),
    torch.nn.Linear(8, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)).eval()
torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, f"{out}/aesthetic_head.pth")

for act, safe in (("gelu", True), ("quick_gelu", False)):
    folder = f"{out}/{act}"
    model, tok, proc = make_model(folder, act, safe)
    with torch.no_grad():
        pv = proc(images=images, return_tensors="pt")["pixel_values"]
        tx = tok(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=pv)
        txt = model.get_text_features(**tx)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = (img / img.norm(dim=-1, keepdim=True) * txt / txt.norm(dim=-1, keepdim=True)).sum(-1)
        scale = model.logit_scale.exp()
        ids_out[act] = [[int(x) for x, m in zip(r, mm) if m] for r, mm in
                        zip(tx["input_ids"].tolist(), tx["attention_mask"].tolist())]
        # the 8-bit resized and cropped images, recovered exactly from the normalised pixels
        mean = torch.tensor(proc.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(proc.image_std).view(1, 3, 1, 1)
        u8 = ((pv * std + mean) * 255).round()
        assert ((pv * std + mean) * 255 - u8).abs().max() < 1e-3
        expected["pixels_u8"] = u8.to(torch.uint8).permute(0, 2, 3, 1)
        expected[f"{act}.pixel_values_mean"] = pv.mean(dim=(1, 2, 3))
        expected[f"{act}.image_embeds"] = img
        expected[f"{act}.text_embeds"] = txt
        expected[f"{act}.pickscore"] = scale * cos / 26
        expected[f"{act}.clip_score"] = scale * cos / 30
        emb = img / torch.linalg.vector_norm(img, dim=-1, keepdim=True)
        expected[f"{act}.aesthetic"] = head(emb).squeeze(1)
save_file({k: v.contiguous() if v.dtype == torch.uint8 else v.contiguous().float()
           for k, v in expected.items()}, f"{out}/expected.safetensors")
with open(f"{out}/expected.json", "w") as f:
    json.dump({"prompts": PROMPTS, "input_ids": ids_out}, f, indent=1)
print("wrote", out, {k: tuple(v.shape) for k, v in expected.items()})
