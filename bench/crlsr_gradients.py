"""Why CRL-SR trails its ablation in PSNR: how each loss term's gradient lines up with the SR L1's (issue 5).

Loads a CRL-SR training run (``state.pt``: the raw weights, not the EMA copy) and draws training batches
from the run's own data pipeline.  For each batch and each weighted loss term of Eq. (8) that reaches the
inference parameters (``L_bc`` on ``Ē_l``; ``L_SRNCE`` on ``Ē_l`` and ``D_ref`` through ``I_s``) it reports

* ``cos``: cosine between the term's gradient and ``L_rec^sr``'s, per parameter group (> 0: the term helps
  the L1 fit, < 0: it pulls against it);
* ``ratio``: the term's gradient norm over ``L_rec^sr``'s.

and, for ``E_f``'s embedding (the space of Eqs. 4-6), whether it still tells positions apart:

* ``pos`` / ``neg``: mean ``f_h^m . f_s^m`` and mean ``f_h^m . f_s^j`` (j != m);
* ``nce``: InfoNCE of (``f_h``, ``f_s``) at temperature 1; ``log M`` means no position information;
* ``push``: mean ``1 - f_s^m . f̄_l^m``, the pushing term of Eq. (4).

Usage::

    python bench/crlsr_gradients.py [--run runs/crlsr_x4] [--config crlsr_x4] [--batches 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from realsr_core.models.crlsr.losses import contrastive_loss, sample_positions  # noqa: E402
from realsr_core.training.trainer import Trainer  # noqa: E402

GROUPS = {"E_l": "encoder_lr.", "D_ref": "refine."}


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params, strict=True)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/crlsr_x4", help="training run folder with state.pt")
    ap.add_argument("--config", default="crlsr_x4", help="the run's config (name or TOML path)")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    trainer = Trainer(args.config, args.run, device="cpu", stream=io.StringIO())
    trainer.load_state()
    model, cfg = trainer.model, trainer.model.loss_config
    params = {g: [p for n, p in model.named_parameters() if n.startswith(pre)] for g, pre in GROUPS.items()}
    batches = trainer._batches()
    rows: list[dict[str, float]] = []
    for _ in range(args.batches):
        lr, hr = next(batches)
        u, f_l, sr = model._super_resolve(lr)
        losses = model.training_losses(lr, hr, generator=trainer.generator)
        terms = {"bc": cfg.weight_bc * losses["bc"], "srnce": cfg.weight_srnce * losses["srnce"]}
        row: dict[str, float] = {}
        for group, ps in params.items():
            g_l1 = flat_grad(cfg.weight_rec_sr * losses["rec_sr"], ps)
            for name, term in terms.items():
                g = flat_grad(term, ps)
                if g.norm() == 0:  # L_bc does not reach D_ref
                    continue
                row[f"cos/{name}/{group}"] = F.cosine_similarity(g, g_l1, dim=0).item()
                row[f"ratio/{name}/{group}"] = (g.norm() / g_l1.norm()).item()
        with torch.no_grad():
            b, _, h, w = f_l.shape
            index = sample_positions(b, h, w, cfg.num_samples, generator=trainer.generator)
            _, (q_h, q_s, q_l) = model.refinement_embeddings(u, sr, hr, index)
            sim = torch.bmm(q_h, q_s.transpose(1, 2))
            m = sim.shape[1]
            diag = sim.diagonal(dim1=1, dim2=2)
            row["pos"] = diag.mean().item()
            row["neg"] = ((sim.sum((1, 2)) - diag.sum(1)) / (m * (m - 1))).mean().item()
            row["nce"] = contrastive_loss(q_h, q_s, tau=1.0).item()
            row["log_M"] = math.log(m)
            row["push"] = (1 - (q_s * q_l).sum(-1)).mean().item()
            row["srnce"] = losses["srnce"].item()
        rows.append(row)
        print(" ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("median: " + " ".join(f"{k} {v:.3f}" for k, v in median.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run": args.run, "step": trainer.step, "batches": rows, "median": median},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
