"""Representation distillation in miniature on background digits (Zhang et al. 2024, experiment 1).

Setup (the background-digits pilot's, restated in docs/EXPERIMENTS.md): a teacher CNN trained with cross-entropy on the broad ``union``
background family (background-invariant); a student of the same trunk with a linear 128-d head,
trained only on ID-background images to fit the teacher's representation with MSE (no labels).
Controls: S-aug (the student trained on union backgrounds), ERM-ID (the teacher's architecture
trained with labels on ID only), S-RF (a frozen random trunk with only the last linear stage fitted
to the teacher by ridge: no feature learning).

Measured per model and seed: linear-probe accuracy ID / OOD (probe fitted on ID training renders),
relative MSE to the teacher ID / OOD, background sensitivity (share of representation variance from
the background with the digit fixed) on ID, OOD and union (the crossed split's) backgrounds, the normalised mean
shift (NMS) per layer between ID and OOD backgrounds on the same foregrounds, beside the same network
at initialisation, background decodability within OOD (ridge R² minus a shuffled control) and the
mechanism attempt: the first-layer filters' weight in the chroma-DC subspace (per-channel constants
with zero channel sum: the only 3x3 RGB directions that carry background colour and no digit) and in
the data-derived background-patch subspace, as a ratio to the initial filters.

Run: ``python -m probekit.experiments.distillation --out DIR`` (``--quick`` for a short run).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..analyses import (
    LinearProbe,
    background_behaviour,
    background_decodability,
    background_sensitivity,
    normalized_mean_shift,
    probe_id_ood,
    relative_mse,
    weight_projections,
)
from ..datasets import BackgroundDigits
from ..store import StoreWriter
from ._common import mean_sd, out_path, pyplot, seeds_list, torch_threads, write_json
from ._digitnets import (
    DigitCNN,
    fit_random_features_student,
    representations,
    train_erm,
    train_student,
    train_teacher,
)

__all__ = [
    "DigitCNN",
    "background_sensitivity_share",
    "filter_subspaces",
    "fit_random_features_student",
    "normalized_mean_shift_share",
    "run",
    "train_erm",
    "train_student",
    "train_teacher",
]

LAYERS = ("block1", "block2", "block3", "rep")
MODELS = ("teacher", "student", "s_aug", "erm_id", "s_rf")


# ---------------------------------------------------------------------------------------------
# metrics (the toolkit's analyses when present; the formulas of docs/METRICS.md otherwise)


def background_sensitivity_share(X: np.ndarray, group: np.ndarray) -> float:
    """Layer background sensitivity (``probekit.analyses.background_sensitivity``, no bootstrap)."""
    return float(background_sensitivity(X, group, n_boot=1).layer)


def normalized_mean_shift_share(X_a: np.ndarray, X_b: np.ndarray) -> float:
    """NMS between two background families (``probekit.analyses.normalized_mean_shift``, no bootstrap)."""
    return float(normalized_mean_shift(X_a, X_b, n_boot=1).nms)


def _rel_mse(S: np.ndarray, T: np.ndarray) -> float:
    """Relative MSE ``sum ||s - t||^2 / sum ||t - mean t||^2`` (``probekit.analyses.relative_mse``, raw)."""
    return float(relative_mse(S, T).raw)


def _decodability_within(X: np.ndarray, factors: np.ndarray, seed: int) -> float:
    """Mean excess R² (over a shuffled control) of ridge probes for the factors, 5-fold CV within X."""
    r = background_decodability(X, factors, categorical=(), n_shuffles=2, n_boot=1, random_state=seed)
    return float(r.mean_excess_r2)


def _probe(Xtr: np.ndarray, ytr: np.ndarray, Xid: np.ndarray, yid: np.ndarray, Xood: np.ndarray, yood: np.ndarray) -> tuple[float, float]:
    """Standardised logistic-regression probe (C = 1) fitted on ID training renders."""
    r = probe_id_ood(Xtr, ytr, Xid, yid, Xood, yood, probe=LinearProbe(C=1.0, max_iter=2000), n_boot=1)
    return float(r.id_accuracy), float(r.ood_accuracy)


# ---------------------------------------------------------------------------------------------
# first-layer weight subspaces


def filter_subspaces(seed: int = 0, k: int = 4) -> dict[str, np.ndarray]:
    """Orthonormal bases (rows, in the 27-d space of flattened 3x3 RGB conv filters, order (c, h, w)).

    ``chroma_dc`` (2): per-channel constants with zero channel sum; ``grey_dc`` (1); ``grey_edge``
    (8): spatial patterns equal across channels, orthogonal to the constant; ``chroma_edge`` (16).
    ``bg_patch`` / ``digit_patch`` (k each): top principal directions of uncentred 3x3 patches of
    ID background-only images and of the digit-only canvases (digit copied to RGB).
    """
    chroma = np.array([[1, -1, 0], [1, 1, -2]], float)
    chroma /= np.linalg.norm(chroma, axis=1, keepdims=True)
    grey = np.ones(3) / np.sqrt(3)
    sp_const = np.ones(9) / 3.0
    q, _ = np.linalg.qr(np.concatenate([sp_const[:, None], np.eye(9)], 1))
    sp_edge = q[:, 1:9].T  # 8 orthonormal zero-mean spatial patterns
    out = {
        "chroma_dc": np.stack([np.kron(c, sp_const) for c in chroma]),
        "grey_dc": np.kron(grey, sp_const)[None],
        "grey_edge": np.stack([np.kron(grey, s) for s in sp_edge]),
        "chroma_edge": np.stack([np.kron(c, s) for c in chroma for s in sp_edge]),
    }
    a = BackgroundDigits("test_id", seed=seed).arrays(range(300))
    bg = torch.from_numpy(a["background"])
    dg = torch.from_numpy(np.repeat(a["digit"][:, None], 3, 1))
    for name, imgs in (("bg_patch", bg), ("digit_patch", dg)):
        P = nn.functional.unfold(imgs, 3).transpose(1, 2).reshape(-1, 27).numpy().astype(np.float64)
        P = P[np.linalg.norm(P, axis=1) > 1e-6]
        _, _, vt = np.linalg.svd(P, full_matrices=False)
        out[name] = vt[:k]
    return out


def _proj_norm(W: np.ndarray, B: np.ndarray) -> float:
    """Mean over filters of ``||B w_j||`` (``probekit.analyses.weight_projections``)."""
    return float(weight_projections(W, B, B).core)


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _layer_acts(model: DigitCNN, x: torch.Tensor, batch_size: int = 600) -> dict[str, np.ndarray]:
    model.eval()
    outs: dict[str, list[np.ndarray]] = {k: [] for k in LAYERS}
    for i in range(0, len(x), batch_size):
        h = x[i : i + batch_size]
        for name in LAYERS[:3]:
            h = getattr(model, name)(h)
            outs[name].append(h.flatten(1).numpy())
        outs["rep"].append(model.rep(h).numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def _eval_data(seed: int, n_backgrounds: int, composite: str) -> dict[str, dict[str, np.ndarray]]:
    kw = dict(seed=seed, composite=composite)
    data = {
        "train": BackgroundDigits("train", renders=2, epoch=50_000, **kw).arrays(),
        "test_id": BackgroundDigits("test_id", renders=2, **kw).arrays(),
        "test_ood": BackgroundDigits("test_ood", renders=2, **kw).arrays(),
        "crossed": BackgroundDigits("crossed", n_backgrounds=n_backgrounds, **kw).arrays(),
        "crossed_id": BackgroundDigits("crossed", n_backgrounds=n_backgrounds, family="id", **kw).arrays(),
        "crossed_ood": BackgroundDigits("crossed", n_backgrounds=n_backgrounds, family="ood", **kw).arrays(),
    }
    for d in data.values():
        for k in ("background", "digit", "mask"):
            d.pop(k, None)
    return data


def _evaluate(models: dict[str, DigitCNN], inits: dict[str, DigitCNN], data, seed: int, subspaces) -> dict[str, Any]:
    reps: dict[str, dict[str, np.ndarray]] = {}
    res: dict[str, Any] = {}
    for name, model in models.items():
        reps[name] = {s: representations(model, torch.from_numpy(d["x"])).numpy() for s, d in data.items()}
    T = reps["teacher"]
    for name, model in models.items():
        R = reps[name]
        r: dict[str, Any] = {}
        r["id_acc"], r["ood_acc"] = _probe(R["train"], data["train"]["label"], R["test_id"], data["test_id"]["label"],
                                           R["test_ood"], data["test_ood"]["label"])
        r["drop"] = r["id_acc"] - r["ood_acc"]
        # the audit's verdict without OOD labels: a probe fit on ID train, its predictions on the
        # crossed split (every test digit on the same broad backgrounds)
        st = data["crossed"]
        probe = LinearProbe(C=1.0, max_iter=2000).fit(R["train"], data["train"]["label"])
        b = background_behaviour(probe.predict(R["crossed"]), st["group"], st["background_id"], label=st["label"],
                                 n_boot=200, n_perm=100, random_state=seed)
        r["verdict_flagged"], r["pull"], r["flip_rate"] = bool(b.flagged), b.pull, b.flip_rate
        if name != "teacher" and name != "erm_id":
            r["rel_mse_id"] = _rel_mse(R["test_id"], T["test_id"])
            r["rel_mse_ood"] = _rel_mse(R["test_ood"], T["test_ood"])
        for s in ("crossed", "crossed_id", "crossed_ood"):
            r[f"bg_sens_{s}"] = background_sensitivity_share(R[s], data[s]["group"])
        r["bg_r2_within_ood"] = _decodability_within(R["test_ood"], data["test_ood"]["factors"], seed)
        # NMS per layer, trained vs the same network at initialisation (same foregrounds, ID vs OOD backgrounds)
        xi, xo = torch.from_numpy(data["test_id"]["x"]), torch.from_numpy(data["test_ood"]["x"])
        A_i, A_o = _layer_acts(model, xi), _layer_acts(model, xo)
        I_i, I_o = _layer_acts(inits[name], xi), _layer_acts(inits[name], xo)
        r["nms"] = {L: normalized_mean_shift_share(A_i[L], A_o[L]) for L in LAYERS}
        r["nms_init"] = {L: normalized_mean_shift_share(I_i[L], I_o[L]) for L in LAYERS}
        r["nms_ratio"] = {L: r["nms"][L] / max(r["nms_init"][L], 1e-12) for L in LAYERS}
        W = model.block1[0].weight.detach().numpy().reshape(16, -1).astype(np.float64)
        W0 = inits[name].block1[0].weight.detach().numpy().reshape(16, -1).astype(np.float64)
        r["conv1_proj"] = {k: _proj_norm(W, B) for k, B in subspaces.items()}
        r["conv1_proj_init"] = {k: _proj_norm(W0, B) for k, B in subspaces.items()}
        r["conv1_proj_ratio"] = {k: r["conv1_proj"][k] / max(r["conv1_proj_init"][k], 1e-12) for k in subspaces}
        # share of the filters' squared norm in each subspace (independent of overall growth)
        tot = (W**2).sum()
        r["conv1_share"] = {k: float(((W @ B.T) ** 2).sum() / tot) for k, B in subspaces.items()}
        res[name] = r
    return res, reps


def run(
    seeds: int | Iterable[int] = 3,
    out_dir: str | None = None,
    quick: bool = False,
    *,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    composite: str = "additive",
    n_backgrounds: int = 8,
    threads: int | None = 1,
    controls: bool = True,
    verbose: bool = True,
    n_stress: int | None = None,
) -> dict[str, Any]:
    """Train teacher, student and controls per seed; evaluate; write store, JSON and plots.

    ``quick=True`` trains 15 teacher / 40 student epochs (instead of 60 / 150, the pilot's). With
    ``verbose``, prints the headline numbers (:func:`headline`). ``n_backgrounds``: backgrounds of the
    crossed split (``n_stress``, its old name, is read with a FutureWarning).
    """
    if n_stress is not None:
        warnings.warn("distillation.run(n_stress=...) is now run(n_backgrounds=...) (the split 'stress' is "
                      "'crossed'); the old name goes in the next release.", FutureWarning, stacklevel=2)
        n_backgrounds = n_stress
    t0 = time.time()
    seeds = seeds_list(seeds)
    te = teacher_epochs if teacher_epochs is not None else (15 if quick else 60)
    se = student_epochs if student_epochs is not None else (40 if quick else 150)
    out = out_path(out_dir, "distillation")
    config = dict(seeds=seeds, teacher_epochs=te, student_epochs=se, composite=composite, n_backgrounds=n_backgrounds,
                  quick=quick, controls=controls, optimizer="adam lr 2e-3 cosine, batch 64")
    per_seed: list[dict[str, Any]] = []
    store = out / "distillation.h5"
    with torch_threads(threads), StoreWriter(store, mode="overwrite") as w:
        for seed in seeds:
            ts = time.time()
            torch.manual_seed(seed)
            t_init = DigitCNN("classifier")
            torch.manual_seed(seed + 1000)
            s_init = DigitCNN("representation")
            teacher = train_teacher(seed=seed, epochs=te, composite=composite)
            models = {"teacher": teacher}
            inits = {"teacher": t_init}
            models["student"] = train_student(teacher, seed=seed, epochs=se, init=s_init, composite=composite)
            inits["student"] = s_init
            if controls:
                models["s_aug"] = train_student(teacher, seed=seed, epochs=se, init=s_init, split="train_union",
                                                composite=composite)
                inits["s_aug"] = s_init
                models["erm_id"] = train_erm(seed=seed, epochs=te, composite=composite)
                inits["erm_id"] = t_init
                models["s_rf"] = fit_random_features_student(teacher, seed=seed, init=s_init, composite=composite)
                inits["s_rf"] = s_init
            train_s = time.time() - ts
            data = _eval_data(seed, n_backgrounds, composite)
            res, reps = _evaluate(models, inits, data, seed, filter_subspaces(seed))
            for name, model in models.items():
                mname = f"{name}_seed{seed}"
                role = "teacher" if name == "teacher" else ("student" if name.startswith("s") else "model")
                w.add_model(mname, role=role, source=f"probekit.experiments.distillation:{name}")
                for step, m in ((0, inits[name]), (se if name.startswith("s") else te, model)):
                    for lname, mod in (("block1.0", m.block1[0]), ("rep.1", m.rep[1])):
                        w.write_weights(mname, lname, mod.weight.detach().reshape(mod.weight.shape[0], -1).numpy(), step=step)
                for lname, mod in (("block1.0", model.block1[0]), ("rep.1", model.rep[1])):
                    w.write_weights(mname, lname, mod.weight.detach().reshape(mod.weight.shape[0], -1).numpy())
            if seed == seeds[0]:  # representations of the first seed, so the store can be audited
                for split in ("train", "test_id", "test_ood", "crossed"):
                    d = data[split]
                    crossed = ["group", "background", "variant"] if split == "crossed" else []
                    w.add_split(split, n_rows=len(d["x"]), has_label=True, factor_names=BackgroundDigits.factor_names,
                                fields=["label", *crossed], factor_periods=BackgroundDigits.factor_periods)
                    for name in models:
                        w.add_layer(f"{name}_seed{seed}", split, "rep", feature_shape=(128,), dtype="float32",
                                    attrs={"pool": "none", "module_type": "Linear", "raw_shape": [128]})
                    samples = {"index": d["index"], "label": d["label"], "factors": d["factors"]}
                    if split == "crossed":
                        samples.update(group=d["group"], background=d["background_id"], variant=d["variant"])
                    w.write_rows(split, 0, samples=samples,
                                 acts={f"{n}_seed{seed}": {"rep": reps[n][split]} for n in models})
                torch.save({n: m.state_dict() for n, m in models.items()}, out / f"models_seed{seed}.pt")
            per_seed.append({"seed": seed, "models": res, "train_seconds": round(train_s, 1)})
    names = list(per_seed[0]["models"])
    summary: dict[str, Any] = {}
    for name in names:
        rs = [p["models"][name] for p in per_seed]
        s: dict[str, Any] = {}
        for k, v in rs[0].items():
            if isinstance(v, dict):
                s[k] = {kk: mean_sd([r[k][kk] for r in rs]) for kk in v}
            else:
                s[k] = mean_sd([r[k] for r in rs])
        summary[name] = s
    diff = [p["models"]["student"]["drop"] - p["models"]["teacher"]["drop"] for p in per_seed]
    from scipy.stats import spearmanr

    fails = {n for n in names if summary[n]["drop"]["mean"] > 0.2}  # the models that fail OOD (> 20 points)
    rows = [(p["models"][n]["pull"], p["models"][n]["drop"]) for p in per_seed for n in names]
    findings = {
        "verdict_matches_ood_failure_every_seed": bool(all(
            p["models"][n]["verdict_flagged"] == (n in fails) for p in per_seed for n in names)),
        "flagged_per_seed": {n: [p["models"][n]["verdict_flagged"] for p in per_seed] for n in names},
        "spearman_pull_vs_drop": float(spearmanr(*zip(*rows, strict=True)).statistic) if len(rows) > 2 else None,
        "student_minus_teacher_drop": mean_sd(diff),
        "student_drop_exceeds_teacher_every_seed": bool(all(d > 0 for d in diff)),
        "id_acc_gap_teacher_minus_student": mean_sd(
            [p["models"]["teacher"]["id_acc"] - p["models"]["student"]["id_acc"] for p in per_seed]),
    }
    result = {"experiment": "distillation", "config": config, "summary": summary, "findings": findings,
              "per_seed": per_seed, "store": str(store), "seconds": round(time.time() - t0, 1)}
    _plot(summary, out, len(seeds))
    result["plots"] = [str(out / "distillation.png")]
    write_json(out / "distillation.json", result)
    if verbose:
        print("\n".join(headline(result)))
    return result


MODEL_LABELS = {
    "teacher": "teacher (labels, broad backgrounds)",
    "student": "student (fits the teacher on ID backgrounds)",
    "s_aug": "S-aug (student on broad backgrounds)",
    "erm_id": "ERM-ID (labels, ID backgrounds)",
    "s_rf": "S-RF (frozen random trunk + ridge)",
}


def _pm(ms: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{scale * ms['mean']:.{digits}f} ± {scale * ms['sd']:.{digits}f}"


def headline(result: dict[str, Any]) -> list[str]:
    """The experiment's headline numbers, a few lines (mean ± sd over seeds)."""
    c, f = result["config"], result["findings"]
    n = len(c["seeds"])
    lines = [f"distillation: {n} seed(s), {c.get('composite', 'additive')} composite; linear-probe accuracy on "
             "ID and OOD backgrounds (%), the drop in points, relative MSE to the teacher"]
    for name, s in result["summary"].items():
        rel = (f"; rel-MSE ID {_pm(s['rel_mse_id'], digits=3)}, OOD {_pm(s['rel_mse_ood'], digits=3)}"
               if "rel_mse_id" in s else "")
        flagged = sum(f["flagged_per_seed"].get(name, []))
        lines.append(f"  {MODEL_LABELS.get(name, name)}: ID {_pm(s['id_acc'], 100)}, OOD {_pm(s['ood_acc'], 100)}, "
                     f"drop {_pm(s['drop'], 100)} pts{rel}; flagged by the verdict in {flagged} of {n} seed(s)")
    lines.append(f"  student's drop minus the teacher's: {_pm(f['student_minus_teacher_drop'], 100)} pts "
                 f"(positive in every seed: {'yes' if f['student_drop_exceeds_teacher_every_seed'] else 'no'}); "
                 f"verdict = fails OOD (drop > 20 pts) in every seed and model: "
                 f"{'yes' if f['verdict_matches_ood_failure_every_seed'] else 'no'}")
    lines.append(f"  ({result['seconds']} s) store {result['store']}, plot {result.get('plots', ['-'])[0]}")
    return lines


def _plot(summary: dict[str, Any], out, n_seeds: int | None = None) -> None:
    plt = pyplot()
    names = list(summary)
    short = {"teacher": "teacher", "student": "student", "s_aug": "S-aug", "erm_id": "ERM-ID", "s_rf": "S-RF"}
    ticks = [short.get(n, n) for n in names]
    over = f"mean ± sd over {n_seeds} seeds" if n_seeds and n_seeds > 1 else "one seed"
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.8))
    x = np.arange(len(names))
    for off, key, lab, hatch in ((-0.2, "id_acc", "ID backgrounds (test_id)", None),
                                 (0.2, "ood_acc", "OOD backgrounds (test_ood, same digits)", "//")):
        ax[0].bar(x + off, [100 * summary[n][key]["mean"] for n in names], 0.4,
                  yerr=[100 * summary[n][key]["sd"] for n in names], label=lab, hatch=hatch, capsize=2,
                  color="C0" if hatch is None else "C1", edgecolor="k", lw=0.5)
    ax[0].set_xticks(x, ticks)
    ax[0].set_ylabel("linear-probe accuracy (%)")
    ax[0].set_ylim(0, 122)
    ax[0].set_yticks(range(0, 101, 20))
    ax[0].set_title(f"probe accuracy on the representation ({over})", fontsize=9)
    ax[0].legend(fontsize=7, loc="upper center", ncol=2)
    layer_x = np.arange(len(LAYERS))
    for i, n in enumerate(names):
        ax[1].errorbar(layer_x + (i - len(names) / 2) * 0.04, [summary[n]["nms_ratio"][L]["mean"] for L in LAYERS],
                       yerr=[summary[n]["nms_ratio"][L]["sd"] for L in LAYERS], marker="os^Dv"[i % 5],
                       ls=["-", "--", ":", "-.", "-"][i % 5], label=MODEL_LABELS.get(n, n), capsize=2)
    ax[1].set_xticks(layer_x, LAYERS)
    ax[1].set_xlabel("layer (block outputs, then the 128-d representation)")
    ax[1].set_yscale("log")
    ax[1].axhline(1.0, color="grey", lw=0.8, ls=":", label="the same network at init (1×)")
    ax[1].set_ylabel("NMS trained / NMS at init (×, log scale)")
    ax[1].set_title("normalised mean shift ID → OOD backgrounds,\nrelative to the same network at initialisation",
                    fontsize=9)
    ax[1].legend(fontsize=6)
    keys = ["chroma_dc", "grey_dc", "bg_patch", "digit_patch"]
    key_labels = ["chroma-DC\n(background colour)", "grey-DC", "background\npatches (top 4)", "digit\npatches (top 4)"]
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        ax[2].bar(np.arange(len(keys)) + i * w, [summary[n]["conv1_proj_ratio"][k]["mean"] for k in keys], w,
                  yerr=[summary[n]["conv1_proj_ratio"][k]["sd"] for k in keys], label=short.get(n, n), capsize=2)
    ax[2].set_xticks(np.arange(len(keys)) + 0.4 - w / 2, key_labels, fontsize=7)
    ax[2].axhline(1.0, color="grey", lw=0.8, ls=":", label="initial level (1×)")
    ax[2].set_ylabel("projection norm trained / at init (×)")
    ax[2].set_title("conv1 filters projected on 3x3 RGB patch subspaces,\nrelative to initialisation", fontsize=9)
    top = max(summary[n]["conv1_proj_ratio"][k]["mean"] + summary[n]["conv1_proj_ratio"][k]["sd"]
              for n in names for k in keys)
    ax[2].set_ylim(0, 1.3 * max(top, 1.0))
    ax[2].legend(fontsize=7, loc="upper center", ncol=3)
    fig.suptitle("Representation distillation on background digits: the student fits its teacher on ID "
                 "backgrounds and fails on OOD ones")
    fig.tight_layout()
    fig.savefig(out / "distillation.png", dpi=90)
    plt.close(fig)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m probekit.experiments.distillation")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--composite", default="additive", choices=["additive", "alpha"])
    a = p.parse_args(argv)
    run(seeds=a.seeds, out_dir=a.out, quick=a.quick, composite=a.composite)  # prints its headline
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
