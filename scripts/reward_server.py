#!/usr/bin/env python3
"""Reference reward server for dgpo's remote rewards (`[[reward]] kind = "remote"`).

Protocols (the same as `src/reward/remote.rs` speaks):
  GET  /health   -> {"status": "ok", "backend": NAME}
  POST /compute  JSON {"prompt": [...], "image": [base64 PNG/JPEG ...], "metadata": [... or null]}
                 -> {"rewards": [...], <sub-metric>: [...], ...}     (Flow-Factory's protocol)
  POST /         pickled {"images": [JPEG bytes], "meta_datas": [...], "only_strict": bool}
                 -> pickled {"scores", "rewards", "strict_rewards", "group_rewards",
                    "group_strict_rewards"}                           (Flow-GRPO's GenEval server)
                 Unpickling runs code chosen by the sender: serve this route to trusted clients only
                 (it listens on 127.0.0.1 unless told otherwise).

Backends (--backend):
  stub       no models: reward = (size of the image file in bytes mod 1000) / 1000, sub-metric
             `prompt_chars`; for protocol tests.
  geneval    GenEval as in Flow-GRPO's server: Mask2Former (mmdetection) detections, CLIP ViT-L/14
             (open_clip) colour classification, the partial-credit reward and strict accuracy of
             docs/algorithm.md. Needs torch, mmdet, mmcv, open_clip_torch, clip_benchmark and the detector
             checkpoint (--geneval-config, --geneval-checkpoint, --geneval-classes).
  ocr        PaddleOCR; reward 1 - dist/len with the target text between the first double quotes.
  pickscore  PickScore_v1 (CLIP-H): logit_scale * cos(image, text) / 26 (transformers).

The protocol layer uses only the standard library, so `--backend stub` runs anywhere; `--self-test`
checks the GenEval and OCR scoring rules on hand-made detections without any model.
"""

import argparse
import base64
import io
import json
import pickle
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GENEVAL_TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
POSITION_THRESHOLD = 0.1


# ----------------------------------------------------------------------------------------------------
# Scoring rules (pure Python, tested by --self-test)


def relative_position(box_a, box_b):
    """Relations of box A to box B (x0, y0, x1, y1), discounting 10 % of both boxes' sizes."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    da = (abs(box_a[2] - box_a[0]), abs(box_a[3] - box_a[1]))
    db = (abs(box_b[2] - box_b[0]), abs(box_b[3] - box_b[1]))
    off = (ca[0] - cb[0], ca[1] - cb[1])
    rev = []
    for k in range(2):
        m = max(abs(off[k]) - POSITION_THRESHOLD * (da[k] + db[k]), 0.0)
        rev.append(m if off[k] >= 0 else -m)
    if abs(rev[0]) < 1e-3 and abs(rev[1]) < 1e-3:
        return set()
    norm = (off[0] ** 2 + off[1] ** 2) ** 0.5
    dx, dy = rev[0] / norm, rev[1] / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def geneval_reward(detected, metadata, colors_of):
    """(strict_correct, reward) of one image, as the reference's `evaluate_reward`.

    detected: {class: [box, ...]} in decreasing confidence; colors_of(class, boxes) -> [colour, ...].
    The reward averages, per include clause, a count term `1 - |n - found| / n` (not clamped), a
    colour term (0 when the count is wrong) and position terms; strict is 1 only when every include
    clause holds exactly (exclude clauses are not looked at, as in the reference). As in the
    reference, a relation that does not hold appends 0 and then 1 (its `append(1.0)` follows the loop).
    """
    correct = True
    terms = []
    groups = []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = detected.get(cls, [])
        matched = True
        terms.append(1 - abs(n - len(found)) / n)
        if len(found) != n:
            correct = matched = False
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                k = colors_of(cls, found).count(req["color"])
                terms.append(1 - abs(n - k) / n)
                if k != n:
                    correct = matched = False
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    correct = matched = False
                    terms.append(0.0)
                else:
                    if not all(rel in relative_position(a, b) for a in found for b in groups[target]):
                        correct = matched = False
                        terms.append(0.0)
                    terms.append(1.0)
        groups.append(found if matched else None)
    return correct, (sum(terms) / len(terms) if terms else 0.0)


def geneval_correct(detected, metadata, colors_of):
    """GenEval's official `evaluate`: at least `count` objects, colour and position checked on the
    `count` most confident ones, an exclude clause fails on `>= count`."""
    correct = True
    groups = []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = detected.get(cls, [])[:n]
        matched = len(found) >= n
        if matched and "color" in req and colors_of(cls, found).count(req["color"]) < n:
            matched = False
        if matched and "position" in req:
            rel, target = req["position"]
            matched = groups[target] is not None and all(
                rel in relative_position(a, b) for a in found for b in groups[target])
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        if len(detected.get(req["class"], [])) >= req["count"]:
            correct = False
    return correct


def levenshtein(a, b):
    try:
        import Levenshtein  # python-Levenshtein, as the reference uses

        return Levenshtein.distance(a, b)
    except ImportError:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]


def ocr_reward(recognised, prompt):
    """1 - dist/len: target = text between the first double quotes, lower-cased, spaces removed;
    dist 0 when the target occurs in the recognised text, else Levenshtein capped at len(target)."""
    parts = prompt.split('"')
    target = (parts[1] if len(parts) >= 3 else prompt).replace(" ", "").lower()
    text = recognised.replace(" ", "").lower()
    if not target:
        return 0.0
    dist = 0 if target in text else min(levenshtein(text, target), len(target))
    return 1 - dist / len(target)


# ----------------------------------------------------------------------------------------------------
# Backends: score(images: [bytes], prompts: [str], metadata: [dict|None]) -> {"rewards": [...], ...}


def decode(images):
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in images]


class Stub:
    name = "stub"

    def score(self, images, prompts, metadata):
        return {
            "rewards": [(len(b) % 1000) / 1000 for b in images],
            "prompt_chars": [float(len(p)) for p in prompts],
        }


class PickScore:
    name = "pickscore"

    def __init__(self, args):
        import torch
        from transformers import AutoModel, AutoProcessor

        self.torch = torch
        self.device = args.device
        self.processor = AutoProcessor.from_pretrained(args.pickscore_processor)
        self.model = AutoModel.from_pretrained(args.pickscore_model).eval().to(self.device)

    def score(self, images, prompts, metadata):
        torch = self.torch
        with torch.no_grad():
            im = self.processor(images=decode(images), return_tensors="pt").to(self.device)
            tx = self.processor(text=prompts, padding=True, truncation=True, max_length=77,
                                return_tensors="pt").to(self.device)
            fi = self.model.get_image_features(**im)
            ft = self.model.get_text_features(**tx)
            fi = fi / fi.norm(dim=-1, keepdim=True)
            ft = ft / ft.norm(dim=-1, keepdim=True)
            s = self.model.logit_scale.exp() * (fi * ft).sum(-1) / 26
        return {"rewards": s.float().cpu().tolist()}


class Ocr:
    name = "ocr"

    def __init__(self, args):
        from paddleocr import PaddleOCR

        self.ocr = PaddleOCR(use_angle_cls=False, lang="en", use_gpu=args.device.startswith("cuda"),
                             show_log=False)

    def score(self, images, prompts, metadata):
        import numpy as np

        out = []
        for im, p in zip(decode(images), prompts):
            res = self.ocr.ocr(np.array(im), cls=False)
            lines = res[0] if res and res[0] else []
            text = "".join(r[1][0] for r in lines if r[1][1] > 0)
            out.append(ocr_reward(text, p))
        return {"rewards": out}


class GenEval:
    name = "geneval"
    THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS = 0.3, 0.9, 16

    def __init__(self, args):
        import open_clip
        import torch
        from clip_benchmark.metrics import zeroshot_classification as zsc
        from mmdet.apis import init_detector

        self.torch, self.zsc, self.device = torch, zsc, args.device
        self.detector = init_detector(args.geneval_config, args.geneval_checkpoint, device=self.device)
        self.clip, _, self.transform = open_clip.create_model_and_transforms(
            "ViT-L-14", pretrained="openai", device=self.device)
        self.tokenizer = open_clip.get_tokenizer("ViT-L-14")
        with open(args.geneval_classes) as f:
            self.classnames = [line.strip() for line in f]
        self.classifiers = {}

    def colors_of(self, image, cls, boxes):
        from PIL import Image

        if cls not in self.classifiers:
            self.classifiers[cls] = self.zsc.zero_shot_classifier(
                self.clip, self.tokenizer, COLORS,
                [f"a photo of a {{c}} {cls}", f"a photo of a {{c}}-colored {cls}",
                 f"a photo of a {{c}} object"], self.device)
        crops = []
        for box, mask in boxes:
            im = image
            if mask is not None:
                im = Image.composite(image, Image.new("RGB", image.size, "#999"), Image.fromarray(mask))
            crops.append(self.transform(im.crop(tuple(box[:4]))))
        with self.torch.no_grad():
            feats = self.clip.encode_image(self.torch.stack(crops).to(self.device))
            feats = feats / feats.norm(dim=-1, keepdim=True)
            logits = feats @ self.classifiers[cls]
        return [COLORS[i] for i in logits.argmax(1).tolist()]

    def score(self, images, prompts, metadata):
        import numpy as np
        from mmdet.apis import inference_detector

        pil = decode(images)
        results = inference_detector(self.detector, [np.array(im) for im in pil])
        scores, strict, correct = [], [], []
        for res, im, meta in zip(results, pil, metadata):
            if meta is None:
                raise ValueError("geneval needs GenEval metadata for every image")
            bbox = res[0] if isinstance(res, tuple) else res
            segm = res[1] if isinstance(res, tuple) and len(res) > 1 else None
            thr = self.THRESHOLD if meta["tag"] != "counting" else self.COUNTING_THRESHOLD
            detected, masks = {}, {}
            for i, cls in enumerate(self.classnames):
                order = np.argsort(bbox[i][:, 4])[::-1]
                order = order[bbox[i][order, 4] > thr][: self.MAX_OBJECTS].tolist()
                if order:
                    detected[cls] = [bbox[i][j][:4].tolist() for j in order]
                    masks[cls] = [None if segm is None else segm[i][j] for j in order]
            def colors(c, bs, im=im, masks=masks):
                return self.colors_of(im, c, list(zip(bs, masks[c])))

            ok, r = geneval_reward(detected, meta, colors)
            scores.append(float(r))
            strict.append(1.0 if ok else 0.0)
            correct.append(1.0 if geneval_correct(detected, meta, colors) else 0.0)
        return {"rewards": scores, "strict_accuracy": strict, "accuracy": correct}


BACKENDS = {"stub": Stub, "pickscore": PickScore, "ocr": Ocr, "geneval": GenEval}


# ----------------------------------------------------------------------------------------------------
# HTTP


def make_handler(backend, lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            sys.stderr.write("reward_server: " + fmt % a + "\n")

        def send(self, code, body, ctype="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def body(self):
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_GET(self):
            if self.path == "/health":
                self.send(200, json.dumps({"status": "ok", "backend": backend.name}).encode())
            else:
                self.send(405, b'{"error": "use POST / or POST /compute"}')

        def do_POST(self):
            if self.path == "/compute":
                try:
                    req = json.loads(self.body())
                    prompts, images = req["prompt"], req["image"]
                    meta = req.get("metadata") or [None] * len(prompts)
                    if not (len(images) == len(prompts) == len(meta)):
                        raise ValueError(f"{len(images)} images, {len(prompts)} prompts, "
                                         f"{len(meta)} metadata entries")
                    raw = [base64.b64decode(s) for s in images]
                except Exception as e:
                    return self.send(400, json.dumps({"error": f"bad request: {e!r}"}).encode())
                try:
                    with lock:
                        out = backend.score(raw, prompts, meta)
                    self.send(200, json.dumps(out).encode())
                except Exception:
                    self.send(500, json.dumps({"error": traceback.format_exc()}).encode())
            elif self.path == "/":
                try:
                    req = pickle.loads(self.body())
                    raw, meta = list(req["images"]), list(req["meta_datas"])
                    prompts = [m.get("prompt", "") for m in meta]
                    with lock:
                        out = backend.score(raw, prompts, meta)
                    scores = [float(x) for x in out["rewards"]]
                    strict = [float(x) for x in out.get("strict_accuracy", [0.0] * len(scores))]
                    correct = [float(x) for x in out.get("accuracy", [0.0] * len(scores))]
                    if req.get("only_strict"):
                        correct = [0.0] * len(scores)
                    group, group_strict = {}, {}
                    for m, c, s in zip(meta, correct, strict):
                        for t in GENEVAL_TAGS:
                            group.setdefault(t, []).append(c if t == m.get("tag") else -10.0)
                            group_strict.setdefault(t, []).append(s if t == m.get("tag") else -10.0)
                    reply = {"scores": scores, "rewards": correct, "strict_rewards": strict,
                             "group_rewards": group, "group_strict_rewards": group_strict}
                    self.send(200, pickle.dumps(reply), "application/octet-stream")
                except Exception:
                    self.send(500, traceback.format_exc().encode(), "text/plain")
            else:
                self.send(404, b'{"error": "no such route"}')

    return Handler


def self_test():
    red, blue = "red", "blue"
    colours = {"circle": [red, blue], "square": [blue]}
    col = lambda c, bs: colours[c][: len(bs)]
    m = {"tag": "color_attr", "include": [{"class": "circle", "count": 1, "color": "red"},
                                          {"class": "square", "count": 1, "color": "blue"}]}
    assert geneval_reward({"circle": [[0, 0, 4, 4]], "square": [[8, 0, 12, 4]]}, m, col) == (True, 1.0)
    # a missing square: count term 0 and colour term 0 for it
    assert geneval_reward({"circle": [[0, 0, 4, 4]]}, m, col) == (False, 0.5)
    m2 = {"tag": "counting", "include": [{"class": "circle", "count": 2}]}
    assert geneval_reward({"circle": [[0, 0, 1, 1]]}, m2, col) == (False, 0.5)
    m3 = {"tag": "position", "include": [{"class": "square", "count": 1},
                                         {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    left = {"square": [[20, 0, 24, 4]], "circle": [[0, 0, 4, 4]]}
    right = {"square": [[0, 0, 4, 4]], "circle": [[20, 0, 24, 4]]}
    assert geneval_reward(left, m3, col) == (True, 1.0)
    assert geneval_reward(right, m3, col) == (False, 0.75)
    assert relative_position([0, 0, 10, 10], [1, 0, 11, 10]) == set()  # within 10 % of the sizes
    assert relative_position([0, 0, 10, 10], [9, 0, 19, 10]) == {"left of"}
    assert geneval_correct(left, m3, col) and not geneval_correct(right, m3, col)
    # more objects than asked: the reward's count term goes to 0 (and below), GenEval's `correct`
    # holds unless an exclude clause forbids them
    m4 = {"tag": "counting", "include": [{"class": "circle", "count": 1}]}
    three = {"circle": [[0, 0, 1, 1], [5, 5, 6, 6], [9, 9, 10, 10]]}
    assert geneval_reward(three, m4, col) == (False, -1.0)
    assert geneval_correct(three, m4, col)
    m4["exclude"] = [{"class": "circle", "count": 2}]
    assert not geneval_correct(three, m4, col)
    assert ocr_reward("Hello World", 'a sign that says "hello world"') == 1.0
    assert ocr_reward("xx hello world yy", 'a sign "Hello World"') == 1.0
    assert abs(ocr_reward("helo world", 'a sign "hello world"') - (1 - 1 / 10)) < 1e-12
    assert ocr_reward("zzzzzzzzzzzzzzzzzzzzz", 'a "cat"') == 0.0
    assert levenshtein("kitten", "sitting") == 3
    print("self-test ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=sorted(BACKENDS), default="stub")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18085, help="0 picks a free port (printed)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pickscore-model", default="yuvalkirstain/PickScore_v1")
    ap.add_argument("--pickscore-processor", default="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    ap.add_argument("--geneval-config", help="mmdetection Mask2Former config (.py)")
    ap.add_argument("--geneval-checkpoint", help="Mask2Former checkpoint (.pth)")
    ap.add_argument("--geneval-classes", help="object_names.txt (the 80 COCO class names, in order)")
    ap.add_argument("--self-test", action="store_true", help="check the scoring rules and exit")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if args.backend == "geneval" and not (args.geneval_config and args.geneval_checkpoint
                                          and args.geneval_classes):
        ap.error("--backend geneval needs --geneval-config, --geneval-checkpoint and --geneval-classes")
    cls = BACKENDS[args.backend]
    backend = cls() if cls is Stub else cls(args)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(backend, threading.Lock()))
    host, port = server.server_address[:2]
    print(f"serving {backend.name} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
