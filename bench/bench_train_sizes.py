"""The fused RLL at the batch sizes people train with, against torch.compile of the reference and PML.

    python bench/bench_train_sizes.py [--reps 15] [--data clustered,iid] [--sizes 64,128,256,512]

fp32, forward + backward, 2 threads, P x K batches with K = 4 per class, at every N in
{64, 128, 256, 512} x D in {128, 512} x semantics in {paper, pml}: ``RLLFused`` (the fused path a
user calls: checks, normalisation, op, autograd) vs ``torch.compile`` of ``rll_kernels.reference``
(compiled once per shape, ``dynamic=False``, warmed up) vs PML 2.9.0 ``RankedListLoss``. For each
shape the three providers on both data sets run round-robin in one process (``--reps`` rounds after
two warm-up calls each) and the medians are compared. Data: "clustered" (class means sharing one
direction plus noise, so a realistic share of the negatives lies inside the margin, printed per
row) and "iid" (Gaussian noise: almost every negative is trivial). Targets: compile / fused >= 1.5
and PML / fused >= 4. Each row also gives the GEMM floor of the fused step (``fused_gemms``: the N x D x N
GEMMs it runs on that data, at the faster of torch.mm and F.linear timed in the same rounds), the
per-call cost of the same step (``RLLFused`` forward + backward at N = 8, same D and semantics, in the
same rounds: checks, dispatch, autograd, allocation, fork/join, next to no pair work) and PML / (floor
+ per-call), the most PML / fused can be with those GEMMs and that cost: a FAIL where the floor alone
misses a target says "GEMM-bound", one where floor + per-call misses it "GEMM + per-call bound".

Then N = 4096, D = 512, paper: fused vs the floor 4 N^2 D FLOPs at the best fp32 GEMM rate of the
run (the faster of ``torch.mm`` with a preallocated output and ``F.linear`` on the whole N x D x N
shape, interleaved with the fused runs). Target: fused / floor <= 1.25.

Prints a markdown table with ratios and PASS/FAIL and writes it to bench/results/train_sizes_latest.md.
"""

from __future__ import annotations

import argparse
import os
import warnings

import torch
import torch.nn.functional as F
from bench_rll_targets import interleaved  # medians of round-robin rounds after two warm-ups

import rll_kernels
from rll_kernels import reference

HERE = os.path.dirname(os.path.abspath(__file__))
K_PER_CLASS = 4
MARGIN, TN = 0.4, 10.0
ALPHA, BETA = 1.0 + MARGIN / 2.0, 1.0 - MARGIN / 2.0  # the defaults of PML and rll_kernels
SHARED, NOISE = 0.65, 0.8  # clustered data: weight of the shared direction, noise scale
TARGET_COMPILE, TARGET_PML, TARGET_FLOOR = 1.5, 4.0, 1.25


def make_batch(n: int, d: int, data: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings (n, d), labels) of n // 4 classes of 4. "clustered": class means
    SHARED u + sqrt(1 - SHARED^2) r_c around one shared unit direction u, plus noise NOISE / sqrt(d)
    per coordinate; "iid": standard Gaussian embeddings."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) // K_PER_CLASS
    if data == "iid":
        return torch.randn(n, d, generator=g), labels
    u = F.normalize(torch.randn(d, generator=g), dim=0)
    r = F.normalize(torch.randn(n // K_PER_CLASS + 1, d, generator=g), dim=1)
    means = SHARED * u + (1.0 - SHARED**2) ** 0.5 * r
    return means[labels] + NOISE * torch.randn(n, d, generator=g) / d**0.5, labels


def nontrivial_shares(emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Shares of the negatives with d < alpha and of the positives with d > beta."""
    z = F.normalize(emb.double(), dim=1)
    dist = torch.cdist(z, z)
    same = labels[:, None] == labels[None, :]
    other = same & ~torch.eye(len(labels), dtype=torch.bool)
    neg = (~same & (dist < ALPHA)).sum() / (~same).sum()
    pos = (other & (dist > BETA)).sum() / other.sum()
    return float(neg), float(pos)


def fwd_bwd(loss, emb: torch.Tensor, labels: torch.Tensor):
    """One forward + backward of ``loss`` on a fresh leaf copy of ``emb``."""

    def run():
        e = emb.detach().requires_grad_()
        loss(e, labels).backward()

    return run


def providers(semantics: str, pml_loss) -> dict:
    """name -> loss(emb, labels): the fused module, torch.compile of the reference (fresh), PML."""
    fused = rll_kernels.RLLFused(margin=MARGIN, Tn=TN, semantics=semantics)

    def dense(e, lab):
        return reference.ranked_list_loss(e, lab, margin=MARGIN, Tn=TN, semantics=semantics)

    torch._dynamo.reset()  # one compiled graph per shape, no recompile limit across shapes
    return {"fused": fused, "compile": torch.compile(dense, dynamic=False), "pml": pml_loss}


# The GEMMs the fused step runs, in units of one N x D x N GEMM: the Gram tiles ("paper": the
# forward's, over the unordered tile pairs from N = 512; "pml": the forward's and the backward's,
# each over the unordered tile pairs only) and one
# coefficient product ("paper": C K, the query gradient; "pml": H z), which the kernel runs as a GEMM
# only where more than 1/8 of a tile's pairs are set members (csrc/cpu_tiles.h add_coef_product) and
# else adds row by row: dense on the clustered data (26-39% of the negatives inside the margin),
# sparse on iid data (none). PML runs three GEMMs of that shape: the distance matrix and its two
# backward products.
DENSE_SHARE = 1 / 8
SYMMETRIC_MIN_ROWS = 256  # csrc/rll_cpu.cpp kSymmetricMinRows: smaller batches run the query-tile forward
# csrc/rll_cpu.cpp kSymmetricGradMinRows (kSymmetricGradMinRowsDeep from D = kSymmetricGradDeep): the
# same for the "paper" gradient
SYMMETRIC_GRAD_MIN_ROWS, SYMMETRIC_GRAD_MIN_ROWS_DEEP, SYMMETRIC_GRAD_DEEP = 320, 256, 512


GRAM_PANEL, GRAM_PANEL_MIN_DEPTH = 32, 256  # csrc/cpu_tiles.h kGramPanel, kGramPanelMinDepth


def symmetric_tile_rows(n: int, threads: int = 2) -> int:
    """B, the rows of a square tile of csrc/rll_cpu.cpp symmetric_tile_rows."""
    b = 256
    while b > 64 and -(-n // b) * (-(-n // b) + 1) // 2 < 2 * threads:
        b //= 2
    return min(b, n)


def symmetric_tiles(n: int, threads: int = 2) -> int:
    """T, the number of square tiles of csrc/rll_cpu.cpp symmetric_tile_rows."""
    return -(-n // symmetric_tile_rows(n, threads))


def symmetric_share(n: int, d: int) -> float:
    """Share of the N x N Gram FLOPs of a kernel visiting each unordered pair of T tiles once; from
    D = 256 a diagonal tile's Gram covers its upper triangle in 32-row panels (csrc/cpu_tiles.h
    gram_tile_upper: (m + 1) / 2m of the tile for m panels)."""
    b = symmetric_tile_rows(n)
    t, m = -(-n // b), -(-b // GRAM_PANEL)
    diagonal = (m + 1) / (2 * m) if b > GRAM_PANEL and d >= GRAM_PANEL_MIN_DEPTH else 1.0
    return (t * (t - 1) / 2 + t * diagonal) / t**2


GRAM_CACHE_BYTES = 8 << 20  # csrc/cpu_tiles.h kGramCacheBytes


def kept_gram_share(n: int) -> float:
    """Share of the "pml" gradient pass's Gram tiles that the forward pass of the same call keeps for
    it (csrc/rll_cpu.cpp rll_pml_in_batch_with_grad, fp32): the tile pairs in order while they fit in
    GRAM_CACHE_BYTES from kSymmetricMinRows rows, the N x N Gram rows at one or two tiles, else none."""
    if n < SYMMETRIC_MIN_ROWS:
        return 1.0 if symmetric_tiles(n) <= 2 and 4 * n * n <= GRAM_CACHE_BYTES else 0.0
    b, t = symmetric_tile_rows(n), symmetric_tiles(n)
    sizes = [min(b, n - i * b) * min(b, n - j * b) for i in range(t) for j in range(i, t)]
    used = kept = 0
    for size in sizes:
        if 4 * (used + size) > GRAM_CACHE_BYTES:
            break
        used, kept = used + size, kept + 1
    return kept / len(sizes)


def fused_gemms(semantics: str, neg_share: float, n: int, d: int) -> float:
    """The fused training step's GEMMs, in units of one N x D x N GEMM, on data with neg_share
    non-trivial negatives (in-batch, 2 threads, fp32, a mean reduction)."""
    coef = 1 if neg_share > DENSE_SHARE else 0
    share = symmetric_share(n, d)
    if semantics == "paper":
        min_rows = SYMMETRIC_GRAD_MIN_ROWS_DEEP if d >= SYMMETRIC_GRAD_DEEP else SYMMETRIC_GRAD_MIN_ROWS
        return (share if n >= min_rows else 1.0) + coef
    forward = share if n >= SYMMETRIC_MIN_ROWS else 1.0
    backward = share if symmetric_tiles(n) > 2 else 1.0  # at T <= 2: blocks of rows against the whole batch
    return forward + backward * (1.0 - kept_gram_share(n)) + coef


def gemm_fns(n: int, d: int) -> dict:
    """One N x D x N GEMM by torch.mm (preallocated output) and by F.linear, for the floor."""
    a, out = torch.randn(n, d), torch.empty(n, n)
    return {("mm", "-"): lambda: torch.mm(a, a.t(), out=out), ("linear", "-"): lambda: F.linear(a, a)}


PER_CALL_ROWS = 8  # the step whose pair work is negligible: its time is the per-call cost


def time_shape(n: int, d: int, semantics: str, datasets: list[str], reps: int, pml_loss) -> list[dict]:
    """One row per data set: the providers' medians, the share of non-trivial pairs, the GEMM
    floor of the fused step (``fused_gemms`` GEMMs at the faster of torch.mm and F.linear) and its
    per-call cost (the fused step at PER_CALL_ROWS rows), all timed in the same rounds."""
    batches = {data: make_batch(n, d, data) for data in datasets}
    fns = gemm_fns(n, d)
    losses = providers(semantics, pml_loss)
    for name, loss in losses.items():
        for data, (emb, labels) in batches.items():
            fns[(name, data)] = fwd_bwd(loss, emb, labels)
    fns[("per_call", "-")] = fwd_bwd(losses["fused"], *make_batch(PER_CALL_ROWS, d, "clustered"))
    t = interleaved(fns, reps)
    gemm = min(t[("mm", "-")], t[("linear", "-")])
    rows = []
    for data, (emb, labels) in batches.items():
        neg, pos = nontrivial_shares(emb, labels)
        floor = fused_gemms(semantics, neg, n, d) * gemm
        rows.append(
            dict(
                N=n,
                D=d,
                semantics=semantics,
                data=data,
                neg=neg,
                pos=pos,
                floor=floor,
                per_call=t[("per_call", "-")],
                **{p: t[(p, data)] for p in ("fused", "compile", "pml")},
            )
        )
    return rows


def misses(r: dict, fused: float) -> bool:
    """Whether a fused step of `fused` seconds would miss a ratio target of row r."""
    return r["compile"] / fused < TARGET_COMPILE or r["pml"] / fused < TARGET_PML


def verdict(r: dict) -> str:
    """PASS, or FAIL with what bounds it: "GEMM-bound" when even the GEMM floor alone (no other
    work) would miss a ratio target, i.e. compile / floor < 1.5 or PML / floor < 4; "GEMM + per-call
    bound" when the floor plus the per-call cost would."""
    if not misses(r, r["fused"]):
        return "PASS"
    if misses(r, r["floor"]):
        return "FAIL (GEMM-bound)"
    return "FAIL (GEMM + per-call bound)" if misses(r, r["floor"] + r["per_call"]) else "FAIL"


def train_size_table(rows: list[dict]) -> list[str]:
    head = ["N", "D", "semantics", "data (non-trivial neg / pos)", "fused ms", "compile ms", "PML ms"]
    head += ["GEMM floor ms", "per-call ms", "compile / fused", "PML / fused", "PML / (floor + per-call)"]
    head += ["target"]
    align = "|---:|---:|---|---|" + "---:|" * 8 + "---|"
    lines = ["| " + " | ".join(head) + " |", align]
    for r in rows:
        c, p = r["compile"] / r["fused"], r["pml"] / r["fused"]
        lines.append(
            f"| {r['N']} | {r['D']} | {r['semantics']} | {r['data']} ({r['neg']:.0%} / {r['pos']:.0%}) | "
            f"{r['fused'] * 1e3:.2f} | {r['compile'] * 1e3:.2f} | {r['pml'] * 1e3:.2f} | "
            f"{r['floor'] * 1e3:.2f} | {r['per_call'] * 1e3:.2f} | "
            f"{c:.2f}x | {p:.2f}x | {r['pml'] / (r['floor'] + r['per_call']):.2f}x | {verdict(r)} |"
        )
    return lines


def floor_rows(reps: int, n: int = 4096, d: int = 512) -> list[str]:
    """N = 4096, D = 512, paper: fused vs 4 N^2 D at the best GEMM rate of torch.mm and F.linear."""
    emb, labels = make_batch(n, d, "clustered")
    a, b, out = torch.randn(n, d), torch.randn(n, d), torch.empty(n, n)
    fused = rll_kernels.RLLFused(margin=MARGIN, Tn=TN, semantics="paper")
    fns = {
        "fused": fwd_bwd(fused, emb, labels),
        "mm": lambda: torch.mm(a, b.t(), out=out),
        "linear": lambda: F.linear(a, b),
    }
    t = interleaved(fns, reps)
    gemm = min(t["mm"], t["linear"])  # one N x D x N GEMM = 2 N^2 D FLOPs
    best = "torch.mm" if t["mm"] <= t["linear"] else "F.linear"
    floor = 2 * gemm
    ratio = t["fused"] / floor
    verdict = "PASS" if ratio <= TARGET_FLOOR else "FAIL"
    rate = f"{2 * n * n * d / gemm / 1e9:.0f} GFLOP/s ({best}; per GEMM torch.mm {t['mm'] * 1e3:.1f} ms"
    return [
        "",
        "| N | D | semantics | fused ms | floor ms (4 N^2 D) | best GEMM rate | fused / floor | target |",
        "|---:|---:|---|---:|---:|---|---:|---|",
        f"| {n} | {d} | paper | {t['fused'] * 1e3:.1f} | {floor * 1e3:.1f} | {rate}, "
        f"F.linear {t['linear'] * 1e3:.1f} ms) | {ratio:.2f} | {verdict} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15, help="interleaved rounds per shape")
    ap.add_argument("--data", default="clustered,iid")
    ap.add_argument("--sizes", default="64,128,256,512")
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--floor-reps", type=int, default=7)
    ap.add_argument("--skip-floor", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from pytorch_metric_learning.losses import RankedListLoss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pml_loss = RankedListLoss(margin=MARGIN, Tn=TN)
    datasets = args.data.split(",")
    rows = []
    for semantics in ("paper", "pml"):
        for d in map(int, args.dims.split(",")):
            for n in map(int, args.sizes.split(",")):
                rows += time_shape(n, d, semantics, datasets, args.reps, pml_loss)
                print(train_size_table(rows[-len(datasets) :])[-1], flush=True)
    lines = train_size_table(rows) + ([] if args.skip_floor else floor_rows(args.floor_reps))
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "train_sizes_latest.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
