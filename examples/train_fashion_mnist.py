#!/usr/bin/env python3
"""Train a small convnet embedding on Fashion-MNIST with the fused losses; report Recall@K, MAP@R and NMI.

Two protocols:
  standard  train on the 60,000 training images (10 classes), retrieve among the 10,000 test images;
  zeroshot  train on the classes {1, 3, 5, 7, 8, 9}, retrieve among the test images of the unseen
            classes {0, 2, 4, 6}.
Each loss trains the same initial network on the same P x K batches (fixed seeds). The final table
lists R@1/2/4/8, MAP@R and R-precision (RP) (tiled, exact: rll_kernels.metrics.retrieval_metrics) and
NMI (scikit-learn k-means) per loss and protocol, next to raw pixels and the untrained network.
``--plot PNG`` adds a t-SNE picture of test embeddings before and after training.

Usage:
  python examples/train_fashion_mnist.py                   # the default configuration (make demo)
  python examples/train_fashion_mnist.py --plot tsne.png   # also the t-SNE picture
  python examples/train_fashion_mnist.py --data DIR        # IDX files elsewhere
  python examples/train_fashion_mnist.py --dataset digits --steps 100   # scikit-learn's digits, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    FASHION_CLASSES,
    ConvEmbedding,
    Split,
    embed,
    load_digits,
    load_fashion_mnist,
    pk_batches,
)

import rll_kernels
from rll_kernels.metrics import nmi, retrieval_metrics

SEEN, UNSEEN = (1, 3, 5, 7, 8, 9), (0, 2, 4, 6)
KS = (1, 2, 4, 8)
COLUMNS = tuple(f"R@{k}" for k in KS) + ("MAP@R", "RP", "NMI")
LOSS_NAMES = {
    "rll": "RLLFused",
    "softtriple": "SoftTripleFused",
    "osm": "WeightedContrastiveFused",
    "contrastive": "PML ContrastiveLoss",
}


def loss_factories(keys: Sequence[str], log=print) -> list[tuple[str, Callable[[int, int], nn.Module]]]:
    """(display name, factory(num_classes, embedding_size)) for each requested loss that exists."""
    out = []
    for key in keys:
        name = LOSS_NAMES[key]
        if key == "rll":
            out.append((name, lambda c, d: rll_kernels.RLLFused(margin=0.4, Tn=10.0, imbalance=0.5)))
        elif key == "softtriple":
            if hasattr(rll_kernels, "SoftTripleFused"):
                out.append(
                    (
                        name,
                        lambda c, d: rll_kernels.SoftTripleFused(
                            c, d, centers_per_class=10, la=20, gamma=0.1, margin=0.01, tau=0.2
                        ),
                    )
                )
            else:
                log(f"{name}: not available in this rll_kernels build, skipped")
        elif key == "osm":
            if hasattr(rll_kernels, "WeightedContrastiveFused"):
                out.append(
                    (
                        name,
                        lambda c, d: rll_kernels.WeightedContrastiveFused(
                            alpha=1.2, sigma=0.8, imbalance=0.5
                        ),
                    )
                )
            else:
                log(f"{name}: not available in this rll_kernels build, skipped")
        elif key == "contrastive":
            try:
                from pytorch_metric_learning.losses import ContrastiveLoss
            except ImportError:
                log(f"{name}: pytorch-metric-learning is not installed, skipped")
                continue
            out.append((name, lambda c, d: ContrastiveLoss(pos_margin=0.0, neg_margin=1.0)))
    return out


def evaluate(emb: torch.Tensor, labels: torch.Tensor, seed: int) -> dict[str, float]:
    """R@1/2/4/8, MAP@R and R-precision over the test set (each test image queries the others), and NMI."""
    m = retrieval_metrics(emb, labels, KS)  # one exact tiled ranking for all of them
    out = {f"R@{k}": m[f"recall@{k}"] for k in KS}
    out["MAP@R"], out["RP"] = m["map@r"], m["r_precision"]
    out["NMI"] = nmi(emb, labels, seed=seed)
    return out


def train(model: nn.Module, loss_fn: nn.Module, data: Split, args, desc: str) -> nn.Module:
    """Adam on P x K batches for ``args.steps`` steps, cosine-annealed learning rate."""
    classes = torch.unique(data.y)
    remap = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
    remap[classes] = torch.arange(classes.numel())
    y = remap[data.y]  # labels 0..C-1 (SoftTriple owns one set of centers per class)
    groups = [{"params": model.parameters(), "lr": args.lr}]
    extra = [p for p in loss_fn.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "lr": args.loss_lr})
    opt = torch.optim.Adam(groups, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    p = min(args.p, classes.numel())
    model.train()
    bar = tqdm(
        pk_batches(y, p, args.k, args.steps, args.seed),
        total=args.steps,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=args.quiet,
    )
    for step, idx in enumerate(bar):
        loss = loss_fn(model(data.x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return model


def protocols(train_split: Split, test_split: Split, names: Sequence[str]) -> dict[str, tuple[Split, Split]]:
    out = {}
    for name in names:
        if name == "standard":
            out[name] = (train_split, test_split)
        elif name == "zeroshot":
            out[name] = (train_split.subset(SEEN), test_split.subset(UNSEEN))
    return out


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    first = next(iter(next(iter(results.values())).values()))
    cols = [c for c in COLUMNS if c in first]  # the columns the rows hold, in the usual order
    lines = ["| protocol | embedding | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for proto, rows in results.items():
        for method, m in rows.items():
            lines.append(f"| {proto} | {method} | " + " | ".join(f"{100 * m[c]:.1f}" for c in cols) + " |")
    return "\n".join(lines)


def tsne_plot(
    path: str, panels: list[tuple[str, torch.Tensor, torch.Tensor]], class_names, seed: int, max_points: int
) -> None:
    """A grid of 2-D t-SNE scatter plots, two panels (before, after) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(9, 4.3 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    gen = torch.Generator().manual_seed(seed)
    for ax, (title, emb, lab) in zip(axes.flat, panels):
        sel = torch.randperm(emb.shape[0], generator=gen)[:max_points]
        z = torch.nn.functional.normalize(emb[sel].double(), dim=1).numpy()
        xy = TSNE(n_components=2, init="pca", perplexity=30, random_state=seed).fit_transform(z)
        lab = lab[sel].numpy()
        for c in sorted(set(lab.tolist())):
            m = lab == c
            ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(c % 10), label=class_names[c], rasterized=True)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=5, markerscale=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=72)
    plt.close(fig)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--dataset", choices=("fashion-mnist", "digits"), default="fashion-mnist")
    ap.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="directory with the Fashion-MNIST IDX files (default: the Debian package's "
        "/usr/share/datasets/fashion-mnist, installed with apt-get when missing and possible)",
    )
    ap.add_argument(
        "--losses", default=",".join(LOSS_NAMES), help=f"comma-separated, from {list(LOSS_NAMES)}"
    )
    ap.add_argument("--protocols", default="standard,zeroshot", help="comma-separated: standard, zeroshot")
    ap.add_argument("--steps", type=int, default=600, help="training steps per loss and protocol")
    ap.add_argument("--p", type=int, default=10, help="classes per batch (at most the training classes)")
    ap.add_argument("--k", type=int, default=6, help="images per class in a batch")
    ap.add_argument("--embedding-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="channels of the first conv layer")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--loss-lr", type=float, default=1e-2, help="learning rate of loss parameters (SoftTriple)"
    )
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument(
        "--eval-size",
        type=int,
        default=0,
        help="evaluate on this many test images (0: all), a fixed random subset",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--plot", metavar="PNG", default=None, help="write a t-SNE picture before/after training")
    ap.add_argument("--plot-points", type=int, default=1500, help="test points per t-SNE panel")
    ap.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    args = ap.parse_args(argv)
    for key in (k.strip() for k in args.losses.split(",")):
        if key not in LOSS_NAMES:
            ap.error(f"--losses: unknown loss {key!r}, expected some of {list(LOSS_NAMES)}")
    for key in (k.strip() for k in args.protocols.split(",")):
        if key not in ("standard", "zeroshot"):
            ap.error(f"--protocols: unknown protocol {key!r}, expected standard and/or zeroshot")
    if args.steps < 1 or args.p < 2 or args.k < 2:
        ap.error(f"need --steps >= 1, --p >= 2, --k >= 2; got {args.steps}, {args.p}, {args.k}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, dict[str, dict[str, float]]]:
    args = parse_args(argv)
    log = (lambda *a, **kw: None) if args.quiet else (lambda *a, **kw: print(*a, **kw, file=sys.stderr))
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    if args.dataset == "digits":
        train_split, test_split = load_digits(seed=args.seed)
        class_names = [str(i) for i in range(10)]
    else:
        train_split, test_split = load_fashion_mnist(args.data)
        class_names = list(FASHION_CLASSES)
    log(
        f"{args.dataset}: {train_split.x.shape[0]} training and {test_split.x.shape[0]} test images; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    factories = loss_factories([k.strip() for k in args.losses.split(",")], log)
    results: dict[str, dict[str, dict[str, float]]] = {}
    panels = []
    torch.manual_seed(args.seed)
    init_state = ConvEmbedding(args.embedding_size, args.width).state_dict()  # shared by every run
    for proto, (tr, te) in protocols(
        train_split, test_split, [p.strip() for p in args.protocols.split(",")]
    ).items():
        if args.eval_size and args.eval_size < te.x.shape[0]:
            keep = torch.randperm(te.x.shape[0], generator=torch.Generator().manual_seed(args.seed))[
                : args.eval_size
            ]
            te = Split(te.x[keep], te.y[keep])
        rows = results[proto] = {}
        rows["raw pixels"] = evaluate(te.x.flatten(1), te.y, args.seed)
        model = ConvEmbedding(args.embedding_size, args.width)
        model.load_state_dict(init_state)
        before = embed(model, te.x)
        rows["untrained network"] = evaluate(before, te.y, args.seed)
        after_first = None
        for name, make in factories:
            torch.manual_seed(args.seed)
            model = ConvEmbedding(args.embedding_size, args.width)
            model.load_state_dict(init_state)
            t0 = time.perf_counter()
            train(
                model,
                make(int(torch.unique(tr.y).numel()), args.embedding_size),
                tr,
                args,
                f"{name} [{proto}]",
            )
            emb = embed(model, te.x)
            rows[name] = evaluate(emb, te.y, args.seed)
            log(
                f"{proto:9s} {name:26s} R@1 {100 * rows[name]['R@1']:.1f}"
                f"  MAP@R {100 * rows[name]['MAP@R']:.1f}  NMI {100 * rows[name]['NMI']:.1f}"
                f"  ({time.perf_counter() - t0:.0f} s)"
            )
            if after_first is None:
                after_first = (name, emb)
        if after_first is not None:
            where = "test images" if proto == "standard" else "unseen test classes"
            panels.append((f"{proto}: untrained network ({where})", before, te.y))
            panels.append((f"{proto}: after {after_first[0]}", after_first[1], te.y))

    table = format_table(results)
    if args.plot and panels:
        tsne_plot(args.plot, panels, class_names, args.seed, args.plot_points)
        log(f"t-SNE picture written to {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "results": results, "seconds": time.perf_counter() - t_start},
                f,
                indent=1,
            )
    if not args.quiet:
        print(
            f"\n{args.dataset}, {args.steps} steps of {args.p} x {args.k} per loss, seed {args.seed}; "
            f"Recall@K, MAP@R, R-precision (RP) and NMI in %; {time.perf_counter() - t_start:.0f} s in all\n"
        )
        print(table)
    return results


if __name__ == "__main__":
    main()
