"""Curves and time-to-target of the DGPO / Flow-GRPO comparison (scripts/compare_algorithms.sh).

Reads <out>/dgpo/metrics.jsonl and <out>/flow_grpo/metrics.jsonl (eval lines), writes
<out>/curves.csv, <out>/curves.png (score against wall-clock time and against rollout images) and
<out>/summary.json, and prints the time each algorithm needs to reach each target score.
"""
import argparse
import csv
import json
import os

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--targets", default="0.35,0.4,0.45,0.5,0.6,0.7,0.8")
p.add_argument("--threads", default="?")
p.add_argument("--minutes", default="?")
a = p.parse_args()

curves = {}
for alg in ("dgpo", "flow_grpo"):
    rows, per_epoch = [], None
    with open(os.path.join(a.out, alg, "metrics.jsonl")) as f:
        lines = [json.loads(l) for l in f if l.strip()]
    train = [l for l in lines if l["kind"] == "train"]
    # images per epoch from the run's config (rollout batch × batches)
    import tomllib

    with open(os.path.join(a.out, alg, "config.toml"), "rb") as f:
        cfg = tomllib.load(f)
    per_epoch = cfg["sample"]["batch_size"] * cfg["sample"]["num_batches_per_epoch"]
    for l in lines:
        if l["kind"] == "eval":
            rows.append(
                dict(
                    algorithm=alg,
                    epoch=l["epoch"],
                    opt_step=l["opt_step"],
                    wall_s=round(l["wall_s"], 1),
                    images=l["epoch"] * per_epoch,
                    geneval_overall=round(l["geneval_overall"], 4),
                    eval_reward_mean=round(l["eval_reward_mean"], 4),
                )
            )
    epoch_s = [t["rollout_s"] + t["reward_s"] + t["update_s"] for t in train]
    curves[alg] = dict(rows=rows, epoch_s=sum(epoch_s) / max(len(epoch_s), 1))

with open(os.path.join(a.out, "curves.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(curves["dgpo"]["rows"][0].keys()))
    w.writeheader()
    for c in curves.values():
        w.writerows(c["rows"])

targets = [float(x) for x in a.targets.split(",")]
summary = {"threads": a.threads, "minutes_each": a.minutes, "targets": {}}
print(f"{'target':>7} {'DGPO s':>8} {'Flow-GRPO s':>12} {'ratio':>7}")
for tg in targets:
    first = {}
    for alg, c in curves.items():
        hit = next((r for r in c["rows"] if r["geneval_overall"] >= tg), None)
        first[alg] = hit
    d, g = first["dgpo"], first["flow_grpo"]
    ratio = (g["wall_s"] / d["wall_s"]) if (d and g and d["wall_s"] > 0) else None
    summary["targets"][str(tg)] = dict(
        dgpo_s=d and d["wall_s"], dgpo_epoch=d and d["epoch"],
        flow_grpo_s=g and g["wall_s"], flow_grpo_epoch=g and g["epoch"], speedup=ratio,
    )
    fmt = lambda r: f"{r['wall_s']:.0f}" if r else "never"
    print(f"{tg:>7} {fmt(d):>8} {fmt(g):>12} {('%.1fx' % ratio) if ratio else '-':>7}")
for alg, c in curves.items():
    best = max(c["rows"], key=lambda r: r["geneval_overall"])
    summary[alg] = dict(
        seconds_per_epoch=round(c["epoch_s"], 2),
        start=c["rows"][0]["geneval_overall"],
        best=best["geneval_overall"], best_epoch=best["epoch"],
        last=c["rows"][-1]["geneval_overall"], last_wall_s=c["rows"][-1]["wall_s"],
        epochs=c["rows"][-1]["epoch"],
    )
    print(f"{alg}: {summary[alg]}")
with open(os.path.join(a.out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(1, 2, figsize=(11, 4))
for alg, c in curves.items():
    lab = "DGPO" if alg == "dgpo" else "Flow-GRPO"
    ax[0].plot([r["wall_s"] / 60 for r in c["rows"]], [r["geneval_overall"] for r in c["rows"]], "o-", label=lab)
    ax[1].plot([r["images"] for r in c["rows"]], [r["geneval_overall"] for r in c["rows"]], "o-", label=lab)
ax[0].set_xlabel("wall-clock minutes (training + evaluations)")
ax[1].set_xlabel("rollout images")
for x in ax:
    x.set_ylabel("GenEval-shapes geneval_overall (test)")
    x.grid(alpha=0.3)
    x.legend()
fig.suptitle(f"shapes testbed, {a.threads} CPU threads, {a.minutes} min each")
fig.tight_layout()
fig.savefig(os.path.join(a.out, "curves.png"), dpi=110)
print(f"wrote {a.out}/curves.csv, curves.png, summary.json")
