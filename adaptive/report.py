"""The campaign's reports: ``experiments.md`` (one table per claim) and ``experiments.png``,
both from ``claims.summarize``'s summary."""

from __future__ import annotations

from typing import Any

import numpy as np

from common import fileio


def _pm(d, digits: int = 4) -> str:
  if not d or d.get("n", 0) == 0:
    return "-"
  if d["n"] == 1:
    return f"{d['mean']:.{digits}f}"
  return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _digits(metric: str) -> int:
  return 2 if metric == "FID" else 4


def _compare_rows(name_a, name_b, comp) -> list[str]:
  return [
    f"| {m} | {name_a} | {name_b} | {_pm(c['a'], _digits(m))} | {_pm(c['b'], _digits(m))} | "
    f"{_pm(c['diff'], _digits(m))} | {c['wins']}/{c['n']} | {c['verdict']} |"
    for m, c in comp.items()
  ]


_COMPARE_HEADER = [
  "| metric | A | B | A | B | A - B (paired) | A wins | verdict |",
  "|---|---|---|---|---|---|---|---|",
]


def write_markdown(path: str, summary: dict[str, Any], command: str) -> None:
  """``experiments.md``: the arms table, FLOPs per group network, then a section per claim."""
  t, c, ref = summary["table"], summary["claims"], summary["reference_arm"]
  lines = [
    *_arms_section(summary["seeds"], t, command),
    *_group_flops_section(t),
    *_c1_section(c["C1"], ref),
    *_c2_section(c["C2"]),
    *_versus_reference("C3", c["C3"], ref),
    *_versus_reference("C4", c["C4"], ref),
    *_c5_section(c["C5"], t),
    *_c6_section(c["C6"]),
    *_versus_reference("E6", c.get("E6", {"rule": "E6", "vs": {}}), ref),
    *_c7_section(c["C7"]),
  ]
  fileio.write_text(path, "\n".join(lines) + "\n")


def _arms_section(seeds, t, command: str) -> list[str]:
  lines = [
    "# TDC experiments (spec §8.3 arms, §8.4 claims)",
    "",
    f"Seeds {seeds}; mean ± std over seeds (one value: one seed). Held-out losses are on the "
    "same fixed (x0, t, eps) test draws for every arm; lower is better everywhere. Verdicts: "
    "better / worse = mean paired difference beyond one s.d. of the differences; with one seed "
    f"only the direction. Pruner: proxy_search(det), not GPT-4. Regenerate: `{command}`.",
    "",
    "## Arms",
    "",
    "| arm | what | L_simple | VLB (bits/dim) | L_simple, raw weights | FID | KID | "
    "FID, raw weights | sampling FLOPs / base | training FLOPs / E0 |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for name, row in t.items():
    lines.append(
      f"| {name} | {row['label']} | {_pm(row['L_simple'])} | {_pm(row['VLB (bits/dim)'])} | "
      f"{_pm(row['L_simple, raw weights'])} | "
      f"{_pm(row['FID'], 2)} | {_pm(row['KID'])} | {_pm(row['FID, raw weights'], 2)} | "
      f"{_pm(row['sampling_flops_ratio'], 3)} | "
      f"{_pm(row['training_cost_ratio'], 3)} |"
    )
  return lines


def _group_flops_section(t) -> list[str]:
  flops_rows = [(n, r["group_flops"]) for n, r in t.items() if r.get("group_flops")]
  if not flops_rows:
    return []
  lines = [
    "",
    "FLOPs per group network (one sampler step, batch 1) over the base network's, XLA cost "
    "analysis (analytic count in brackets), and the sampler steps each group runs:",
    "",
    "| arm | seed | per group: t range, XLA (analytic) FLOPs / base, sampler steps |",
    "|---|---|---|",
  ]
  for name, gf in flops_rows:
    parts = [
      f"g{g} t{tr[0]}-{tr[1]}: {x:.3f} ({a:.3f}), {n} steps"
      for g, (tr, x, a, n) in enumerate(
        zip(gf["t_ranges"], gf["xla_ratio"], gf["analytic_ratio"], gf["sampling_steps"],
            strict=False)
      )
    ]  # fmt: skip
    lines.append(f"| {name} | {gf['seed']} | {'; '.join(parts)} |")
  return lines


def _c1_section(c1, ref: str) -> list[str]:
  lines = ["", f"## C1: {c1['rule']}", ""]
  lines.append(f"{ref} sampling FLOPs / base: {_pm(c1['sampling_flops_ratio'], 3)}.")
  lines += ["", *_COMPARE_HEADER]
  for b, comp in c1["vs"].items():
    lines += _compare_rows(ref, b, comp)
  return lines


def _c2_section(c2) -> list[str]:
  lines = ["", f"## C2: {c2['rule']}", ""]
  lines.append(
    f"E1 below E0+ on the seed mean in {c2['groups_won_vs_E0plus_on_seed_mean']} of "
    f"{c2['groups']} groups (L_simple)."
  )
  lines += ["", "| group | B | E1 L_simple | B L_simple | A - B | E1 wins | verdict | E1 VLB/step | "
            "B VLB/step | verdict (VLB) | E1 raw L_simple | B raw L_simple | verdict (raw) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
  for b, rows in c2["per_group"].items():
    for g, r in enumerate(rows):
      ls, vb, rw = r["l_simple"], r["vlb"], r.get("l_simple_raw")
      raw = f"{_pm(rw['a'])} | {_pm(rw['b'])} | {rw['verdict']}" if rw else "- | - | -"
      lines.append(
        f"| {g} | {b} | {_pm(ls['a'])} | {_pm(ls['b'])} | {_pm(ls['diff'])} | "
        f"{ls['wins']}/{ls['n']} | {ls['verdict']} | {_pm(vb['a'])} | {_pm(vb['b'])} | "
        f"{vb['verdict']} | {raw} |"
      )
  return lines


def _versus_reference(key: str, claim, ref: str) -> list[str]:
  """A claim's section of paired comparisons of the reference arm against others."""
  lines = ["", f"## {key}: {claim['rule']}", "", *_COMPARE_HEADER]
  if not claim["vs"]:
    lines.append("| (not run) | | | | | | | |")
  for b, comp in claim["vs"].items():
    lines += _compare_rows(ref, b, comp)
  return lines


def _c5_section(c5, t) -> list[str]:
  lines = ["", f"## C5: {c5['rule']}", ""]
  lines += [
    "| arm | what | sampling FLOPs / base | L_simple | VLB (bits/dim) | FID | KID |",
    "|---|---|---|---|---|---|---|",
  ]
  for name in c5["arms"]:
    row = t[name]
    lines.append(
      f"| {name} | {row['label']} | {_pm(row['sampling_flops_ratio'], 3)} | "
      f"{_pm(row['L_simple'])} | {_pm(row['VLB (bits/dim)'])} | {_pm(row['FID'], 2)} | "
      f"{_pm(row['KID'])} |"
    )
  if c5["pairs"]:
    lines += ["", *_COMPARE_HEADER]
    for pair, comp in c5["pairs"].items():
      a, b = pair.split(" vs ")
      lines += _compare_rows(a, b, comp)
  return lines


def _c6_section(c6) -> list[str]:
  lines = ["", f"## C6: {c6['rule']}", ""]
  lines += [
    "| pruner | final proxy score | proxy evaluations | rounds | FLOPs / base | spread over "
    "proxy seeds | proxy_memory lower | every search: proxy_memory lower / tie / higher | "
    "every search: evaluations |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  if not c6["variants"]:
    lines.append("| (not run) | | | | | | | | |")
  for v, r in c6["variants"].items():
    cells = r["cells"]
    lines.append(
      f"| {v} | {_pm(r['score'])} | {_pm(r['evaluations'], 1)} | {_pm(r['rounds'], 1)} | "
      f"{_pm(r['flops_ratio'], 3)} | {r['spread_over_proxy_seeds']:.4f} | "
      f"{r['proxy_memory_wins']}/{r['n']} | "
      f"{cells['lower']} / {cells['tie']} / {cells['higher']} | "
      f"{_pm(r['evaluations_all_cells'], 1)} |"
    )
  if c6["variants"]:
    lines += [
      "",
      "Score, evaluations, rounds and FLOPs: per training seed the mean over pruned groups at "
      "proxy seed 0, then mean ± std over training seeds. Spread: the std over proxy seeds of "
      "one (training seed, group), averaged. The last two columns pool every (training seed, "
      "group, proxy seed) search the pruner ran.",
    ]
  return lines


def _c7_section(c7) -> list[str]:
  lines = ["", f"## C7: {c7['rule']}", ""]
  lines += [
    "| arm | stage 1 (base steps) | stage 2 (base steps) | total / E0 | holds |",
    "|---|---|---|---|---|",
  ]
  for name, r in c7["arms"].items():
    tc = r["training_cost"]
    lines.append(
      f"| {name} | {tc['stage1']:.0f} | {tc['stage2']:.0f} | {tc['ratio']:.4f} | {r['holds']} |"
    )
  return lines


def write_plot(path: str, summary: dict[str, Any]) -> None:
  """``experiments.png``: held-out L_simple per reference group and arm, FID against sampling
  FLOPs, and E5's final proxy score per pruner."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = summary["table"]
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
  names = list(t)
  n_groups = max((len(r["per_group_l_simple"]) for r in t.values()), default=0)
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    vals = [d["mean"] for d in t[name]["per_group_l_simple"]]
    errs = [d["std"] for d in t[name]["per_group_l_simple"]]
    axes[0].bar(np.arange(n_groups) + i * width, vals, width, yerr=errs, label=name)
  axes[0].set_xticks(np.arange(n_groups) + 0.4 - width / 2, [f"g{g}" for g in range(n_groups)])
  axes[0].set_title("held-out L_simple per reference group (lower better)", fontsize=9)
  axes[0].set_yscale("log")
  axes[0].legend(fontsize=6)
  for i, name in enumerate(names):
    x, y = t[name]["sampling_flops_ratio"], t[name]["FID"]
    if y["n"]:
      axes[1].errorbar(x["mean"], y["mean"], yerr=y["std"], fmt="o", color=f"C{i % 10}")
      axes[1].annotate(name, (x["mean"], y["mean"]), fontsize=7)
  axes[1].set_xlabel("sampling FLOPs / base model")
  axes[1].set_ylabel("FID (digits features)")
  axes[1].set_title("sample quality vs sampling FLOPs", fontsize=9)
  c6 = summary["claims"]["C6"]["variants"]
  if c6:
    vs = list(c6)
    axes[2].bar(vs, [c6[v]["score"]["mean"] for v in vs], yerr=[c6[v]["score"]["std"] for v in vs])
    axes[2].tick_params(axis="x", labelrotation=30, labelsize=7)
    # A collapsed pruner scores 10-50x the others; on a linear axis the rest look equal.
    axes[2].set_yscale("log")
  axes[2].set_title("E5: final proxy score per pruner (lower better, log)", fontsize=9)
  fig.suptitle(f"TDC experiments, seeds {summary['seeds']}")
  fig.tight_layout()
  fileio.write_figure(fig, path, dpi=110)
