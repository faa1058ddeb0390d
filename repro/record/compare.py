"""Compare stored results across commits (`repro compare`), a metric's history (`repro history`), and the one
noise-aware verdict both use (``verdict``).

A value at one commit is the mean +- sample std over the seeds stored for it (stages that differ only in ``seed``).
Two sides differ when |head - base| > K * sqrt(s_b^2/n_b + s_h^2/n_h) (Welch's standard error of the difference,
K = 2: about a 95% two-sided test under normal noise); with a single seed on a side there is no spread to measure
the noise by, and the verdict says so instead of guessing a tolerance.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from repro.config import ConfigError, config_hash
from repro.record.store import git, ingest, records, resolve_revision

K = 2.0
NO_SPREAD = "no seed spread: verdict unavailable"
# Cost fields compared as head/base ratios (lower is better unless listed in HIGHER_BETTER); the default comparison
# shows them for pretraining stages only (``--metric`` selects any of them for any stage).
COST_NAMES = {"images_per_s": "images/s", "step_time_s": "step time (s)", "device_hours": "device-h",
              "peak_memory_mb": "peak memory (MB)", "flops_per_image": "FLOPs/image", "wall_s": "wall (s)"}
DEFAULT_COST = ("images_per_s", "step_time_s", "device_hours")
HIGHER_BETTER_COST = {"images_per_s"}


@dataclass(frozen=True)
class Summary:
    mean: float
    std: float  # sample std (0 with one value)
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4g} +- {self.std:.2g} (n={self.n})"


@dataclass(frozen=True)
class Verdict:
    base: Summary
    head: Summary
    diff: float  # head - base
    tolerance: float | None  # K * Welch standard error; None without seed spread on a side
    verdict: str  # improved / regressed / within noise / NO_SPREAD

    @property
    def ratio(self) -> float | None:
        return self.head.mean / self.base.mean if self.base.mean else None


def summarize(values: Iterable[float]) -> Summary:
    v = [float(x) for x in values]
    if not v:
        raise ValueError("no values")
    return Summary(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))


def verdict(base: Sequence[float], head: Sequence[float], higher_is_better: bool = True, k: float = K) -> Verdict:
    """Improved / regressed / within noise from the seed spread of both sides (see the module docstring)."""
    b, h = summarize(base), summarize(head)
    diff = h.mean - b.mean
    if b.n < 2 or h.n < 2:
        return Verdict(b, h, diff, None, NO_SPREAD)
    tol = k * math.sqrt(b.std**2 / b.n + h.std**2 / h.n)
    if abs(diff) <= tol:
        word = "within noise"
    else:
        word = "improved" if (diff > 0) == higher_is_better else "regressed"
    return Verdict(b, h, diff, tol, word)


def higher_is_better(metric: str) -> bool:
    if metric in COST_NAMES:
        return metric in HIGHER_BETTER_COST
    return not any(w in metric for w in ("loss", "error", "time", "hours", "memory"))


# --------------------------------------------------------------------------------------------------- grouping
def _seedless(cfg_json: str) -> str:
    """A stage's configuration without what differs between seeds or machines (seed, input path, dataset path)."""
    from repro.pipeline.stage import _strip

    cfg = json.loads(cfg_json or "{}")
    for k in ("seed", "init"):
        cfg.pop(k, None)
    cfg = _strip(cfg)
    if isinstance(cfg.get("data"), dict):
        cfg["data"].pop("path", None)
    return config_hash(cfg, 10)


def group_key(r: Mapping[str, Any]) -> tuple:
    """What a stored result measures, seeds and commits aside: its table row (with the run's overrides), or for a
    stage in no table its kind, recipe and configuration without the seed."""
    if r.get("table_id"):
        return (r["scale"], r["table_id"], r["row_index"], r["row_label"], r["overrides"] or "[]", r["kind"])
    return (r["scale"], "", -1, r.get("label") or r.get("recipe") or "", _seedless(r.get("config")), r["kind"])


def values(r: Mapping[str, Any], metric: str) -> float | None:
    v = r.get(metric) if metric in COST_NAMES else r["metrics"].get(metric)
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _device(r: Mapping[str, Any]) -> str:
    return f"{r.get('device') or '?'} ({r.get('device_name') or '?'})"


def _select(recs: list[dict[str, Any]], table: str | None, scale: str | None, known_metrics: set[str],
            metric: str | None) -> list[dict[str, Any]]:
    if metric and metric not in known_metrics:
        raise ConfigError(f"metric {metric!r} is not in the store; stored metrics: {', '.join(sorted(known_metrics))}")
    if table:
        from repro.spec import load_specs

        tables = {r["table_id"] for r in recs if r.get("table_id")}
        if table not in tables:
            if table not in load_specs() and not table.startswith("bench/"):
                raise ConfigError(f"unknown table {table!r}; `repro tables` lists them")
            raise ConfigError(f"no stored results for table {table}; run `repro run {table}` first")
        recs = [r for r in recs if r.get("table_id") == table]
    if scale:
        recs = [r for r in recs if r["scale"] == scale]
    return recs


def _metric_names(recs: Iterable[Mapping[str, Any]]) -> set[str]:
    return {m for r in recs for m in r["metrics"]} | set(COST_NAMES)


def load(runs_root: str | Path) -> list[dict[str, Any]]:
    """Every stored record, after collecting what the runs folder holds that the store does not yet."""
    if not Path(runs_root).is_dir():
        raise ConfigError(f"no results store at {runs_root} (no such runs folder); pass --runs-dir or set REPRO_RUNS")
    ingest(runs_root)
    return records(runs_root)


DIRTY = "+dirty"


def _short(sha: str, dirty: bool = False) -> str:
    return sha[:10] + (DIRTY if dirty else "")


def parse_side(rev: str) -> tuple[str, bool]:
    """A side of a comparison: a git revision, with ``+dirty`` for the results made with uncommitted changes on top
    of it (without: only results from a clean tree)."""
    dirty = rev.endswith(DIRTY)
    return resolve_revision(rev.removesuffix(DIRTY)), dirty


# ---------------------------------------------------------------------------------------------------- compare
@dataclass
class Line:
    table: str
    row: str
    kind: str
    metric: str
    v: Verdict
    cost: bool
    device: str


def compare(runs_root: str | Path, base: str, head: str, table: str | None = None, scale: str | None = None,
            metric: str | None = None, allow_device_mismatch: bool = False) -> tuple[list[Line], dict[str, Any]]:
    """Lines of a comparison of two revisions' stored results, and facts for its header. Bad input raises
    ``ConfigError`` with one line."""
    want = {"base": parse_side(base), "head": parse_side(head)}
    sha = {side: w[0] for side, w in want.items()}
    recs = load(runs_root)
    recs = _select(recs, table, scale, _metric_names(recs), metric)
    where = "".join(f" {w} {x}" for w, x in (("in table", table), ("at scale", scale)) if x)
    sides: dict[str, list[dict[str, Any]]] = {}
    for side, rev in (("base", base), ("head", head)):
        at = [r for r in recs if r["commit_sha"] == sha[side]]
        sides[side] = [r for r in at if bool(r.get("dirty")) == want[side][1]]
        if not sides[side]:
            other = "" if len(at) == len(sides[side]) else (
                f" ({len(at)} made {'without' if want[side][1] else 'with'} uncommitted changes: "
                f"{_short(sha[side], not want[side][1])})")
            how = ("`repro run TABLE...` in a working tree with changes on top of it" if want[side][1] else
                   f"`repro run --commit {rev} TABLE...`")
            raise ConfigError(f"no stored results for {side} {rev} ({_short(sha[side], want[side][1])}){where}"
                              f"{other}; run them with {how}")
    groups: dict[tuple, dict[str, list[dict[str, Any]]]] = {}
    for side, rs in sides.items():
        for r in rs:
            groups.setdefault(group_key(r), {"base": [], "head": []})[side].append(r)
    common = {g: s for g, s in groups.items() if s["base"] and s["head"]}
    if not common:
        raise ConfigError(f"{base} and {head} have no stage{where} in common to compare")
    devices = {side: sorted({_device(r) for s in common.values() for r in s[side]}) for side in ("base", "head")}
    mismatch = devices["base"] != devices["head"]
    if mismatch and not allow_device_mismatch:
        raise ConfigError(f"the sides were measured on different devices ({', '.join(devices['base'])} vs "
                          f"{', '.join(devices['head'])}); compare runs from one machine, or pass "
                          "--allow-device-mismatch to see them flagged")
    out: list[Line] = []
    for g in sorted(common, key=lambda g: tuple(str(x) for x in g)):
        s = common[g]
        names = sorted({m for r in s["base"] + s["head"] for m in r["metrics"]})
        cost = [c for c in COST_NAMES
                if metric == c or (metric is None and g[-1] == "pretrain" and c in DEFAULT_COST)]
        for m in ([metric] if metric and metric not in COST_NAMES else [] if metric else names) + cost:
            vb = [x for x in (values(r, m) for r in s["base"]) if x is not None]
            vh = [x for x in (values(r, m) for r in s["head"]) if x is not None]
            if not vb or not vh:
                continue
            dev = ", ".join(sorted({_device(r) for r in s["base"] + s["head"]}))
            row = g[3] + (f" [{', '.join(json.loads(g[4]))}]" if g[1] and g[4] not in ("[]", None) else "")
            out.append(Line(g[1] or "-", row, g[-1], m, verdict(vb, vh, higher_is_better(m)), m in COST_NAMES,
                            dev))
    if not out:
        raise ConfigError(f"no metric{' ' + metric if metric else ''} stored on both sides{where}")
    dirty = {side: want[side][1] for side in sides}
    return out, {"sha": sha, "rev": {"base": base, "head": head}, "devices": devices, "mismatch": mismatch,
                 "dirty": dirty}


def _cells(ln: Line, mismatch: bool) -> list[str]:
    v = ln.v
    change = (f"x{v.ratio:.3f}" if v.ratio is not None else "-") if ln.cost else f"{v.diff:+.4g}"
    word = v.verdict + (f" (tol {v.tolerance:.2g})" if v.tolerance is not None else "")
    if ln.cost and mismatch:
        word += " [devices differ]"
    metric = COST_NAMES.get(ln.metric, ln.metric)
    return [ln.table, ln.row, ln.kind, metric + (f" @ {ln.device}" if ln.cost else ""), str(v.base), str(v.head),
            change, word]


HEADER = ["table", "row", "stage", "metric", "base", "head", "change", "verdict"]


def header_lines(facts: Mapping[str, Any]) -> list[str]:
    s, d = facts["sha"], facts["dirty"]
    return [f"base {facts['rev']['base']} = {_short(s['base'], d['base'])}, head {facts['rev']['head']} = "
            f"{_short(s['head'], d['head'])}; devices: base {', '.join(facts['devices']['base'])}, head "
            f"{', '.join(facts['devices']['head'])}" + (" (DIFFERENT: cost ratios are not comparable)"
                                                        if facts["mismatch"] else ""),
            f"values: mean +- std over seeds (n); verdict: |head - base| > {K:g} x sqrt(s_b^2/n_b + s_h^2/n_h); "
            "cost as the ratio head/base"]


def format_text(lines: Sequence[Line], facts: Mapping[str, Any]) -> str:
    rows = [HEADER] + [_cells(ln, facts["mismatch"]) for ln in lines]
    w = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    body = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join([*header_lines(facts), "", *body, "", summary_line(lines)]) + "\n"


def format_markdown(lines: Sequence[Line], facts: Mapping[str, Any]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("+-", "±")

    out = [f"### repro compare {facts['rev']['base']} {facts['rev']['head']}", ""]
    out += [f"- {esc(h)}" for h in header_lines(facts)] + [""]
    out += ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for ln in lines:
        cells = _cells(ln, facts["mismatch"])
        if ln.v.verdict in ("improved", "regressed"):
            cells[-1] = f"**{cells[-1]}**"
        out.append("| " + " | ".join(esc(c) for c in cells) + " |")
    return "\n".join([*out, "", summary_line(lines), ""])


def summary_line(lines: Sequence[Line]) -> str:
    counts: dict[str, int] = {}
    for ln in lines:
        counts[ln.v.verdict] = counts.get(ln.v.verdict, 0) + 1
    return "verdicts: " + ", ".join(f"{n} {w}" for w, n in sorted(counts.items()))


def regressions(lines: Sequence[Line]) -> list[Line]:
    return [ln for ln in lines if ln.v.verdict == "regressed"]


# ---------------------------------------------------------------------------------------------------- history
def commit_time(sha: str) -> float | None:
    out = git("show", "-s", "--format=%ct", sha)
    return float(out) if out and out.isdigit() else None


@dataclass
class Point:
    commit: str
    when: float
    summary: Summary
    values: list[float]
    dirty: bool


def history(runs_root: str | Path, metric: str, table: str | None = None, row: str | None = None,
            scale: str | None = None) -> dict[str, list[Point]]:
    """Per series (a table row and stage, or a stage outside tables): the metric's mean +- std over seeds at each
    stored commit, ordered by commit date (the results' date for commits git no longer has)."""
    recs = load(runs_root)
    recs = _select(recs, table, scale, _metric_names(recs), metric)
    if row is not None:
        rows = {r["row_label"] for r in recs if r.get("row_label")}
        if row not in rows:
            raise ConfigError(f"no stored row {row!r}{' in ' + table if table else ''}; stored rows: "
                              f"{', '.join(sorted(rows)) or '-'}")
        recs = [r for r in recs if r.get("row_label") == row]
    series: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in recs:
        if values(r, metric) is None or not r.get("commit_sha"):
            continue
        g = group_key(r)
        name = (f"{g[1]} {g[3]}" if g[1] else f"{g[3]}") + f" ({g[-1]}, {g[0]})"
        if g[1] and g[4] not in ("[]", None):
            name += f" [{', '.join(json.loads(g[4]))}]"
        series.setdefault(name, {}).setdefault((r["commit_sha"], bool(r.get("dirty"))), []).append(r)
    if not series:
        raise ConfigError(f"no stored values of {metric}" + "".join(f" {w} {x}" for w, x in
                                                                   (("in table", table), ("row", row),
                                                                    ("at scale", scale)) if x))
    out: dict[str, list[Point]] = {}
    dates: dict[str, float | None] = {}
    for name, by_commit in sorted(series.items()):
        pts = []
        for (sha, dirty), rs in by_commit.items():
            if sha not in dates:
                dates[sha] = commit_time(sha)
            vals = [values(r, metric) for r in rs]
            # uncommitted changes on top of a commit come after it
            when = (dates[sha] + 0.5 * dirty) if dates[sha] else min((r.get("finished") or 0.0) for r in rs)
            pts.append(Point(sha, when, summarize(vals), vals, dirty))
        out[name] = sorted(pts, key=lambda p: p.when)
    return out


def format_history(metric: str, hist: Mapping[str, list[Point]]) -> str:
    import time

    lines = [f"{metric}: mean +- std over seeds (n) per commit, oldest first"]
    for name, pts in hist.items():
        lines += ["", name]
        for p in pts:
            lines.append(f"  {time.strftime('%Y-%m-%d %H:%M', time.gmtime(p.when))}  {_short(p.commit, p.dirty):16s}"
                         f"  {p.summary}")
    return "\n".join(lines) + "\n"


def plot_history(metric: str, hist: Mapping[str, list[Point]], out: str | Path) -> Path:
    """One line per series over the commits (in date order), mean with a band of +- std and every seed's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted({(p.when, p.commit, p.dirty) for pts in hist.values() for p in pts})
    x_of = {(c, d): i for i, (_, c, d) in enumerate(order)}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(order) + 3), 4.2))
    for name, pts in list(hist.items())[:10]:
        xs = [x_of[p.commit, p.dirty] for p in pts]
        m = [p.summary.mean for p in pts]
        s = [p.summary.std for p in pts]
        (line,) = ax.plot(xs, m, marker="o", label=name)
        ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=line.get_color(),
                        alpha=0.2, linewidth=0)
        for x, p in zip(xs, pts):
            ax.scatter([x] * len(p.values), p.values, s=10, color=line.get_color(), alpha=0.6)
    ax.set_xticks(range(len(order)), [_short(c, d) for _, c, d in order], rotation=30, ha="right",
                  fontsize=8)
    ax.set_xlabel("commit (by commit date)")
    ax.set_ylabel(COST_NAMES.get(metric, metric))
    ax.set_title(f"{metric} across commits: mean, band = +- std over seeds, dots = seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    from io import BytesIO

    from repro.io import atomic_write_bytes

    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def history_plot_path(plots_root: str | Path, metric: str, table: str | None, row: str | None) -> Path:
    import re

    name = "-".join(x for x in (metric, table, row) if x)
    return Path(plots_root) / "history" / (re.sub(r"[^A-Za-z0-9_.+-]+", "_", name) + ".png")


# -------------------------------------------------------------------------------------------------------- CLI
def add_parsers(sub: Any, runs_help: str) -> None:
    """`repro compare` and `repro history`."""
    p = sub.add_parser("compare", help="compare stored results of two commits: mean +- std over seeds, verdicts",
                       description="Per table, row, stage and metric: both commits' values (mean +- std over seeds), "
                                   "the difference (cost: the ratio, with the device) and a verdict (improved / "
                                   f"regressed / within noise: |diff| > {K:g} x the Welch standard error of the seed "
                                   "spreads; none without seeds). Reads the results store under the runs folder.")
    p.add_argument("base", help="git revision of the base side (commit id, branch, tag, HEAD~1); REV+dirty: the "
                                "results made with uncommitted changes on top of REV")
    p.add_argument("head", help="git revision of the head side (e.g. HEAD+dirty: this working tree's results)")
    p.add_argument("--table", help="one table id (e.g. localmim/t4a), or bench/... for the benchmark")
    p.add_argument("--scale", choices=("tiny", "paper"))
    p.add_argument("--metric", help="one metric (e.g. linear_top1, knn_top1_k20, images_per_s, step_time_s)")
    p.add_argument("--markdown", metavar="FILE", help="also write the comparison as markdown (for a pull request)")
    p.add_argument("--fail-on-regression", action="store_true", help="exit 1 if any verdict is `regressed`")
    p.add_argument("--allow-device-mismatch", action="store_true",
                   help="compare sides measured on different devices, flagging the cost rows")
    p.add_argument("--runs-dir", help=runs_help)

    p = sub.add_parser("history", help="a metric across the stored commits: table + plot with the noise band",
                       description="The metric's mean +- std over seeds at each stored commit, in commit-date order, "
                                   "as a table and as plots/history/<metric>[-<table>-<row>].png.")
    p.add_argument("metric", help="a metric (e.g. linear_top1) or cost field (images_per_s, step_time_s, ...)")
    p.add_argument("--table")
    p.add_argument("--row", help="a row label of --table")
    p.add_argument("--scale", choices=("tiny", "paper"))
    p.add_argument("--plots-dir", default="plots", help="where plots/history/ goes (default: ./plots)")
    p.add_argument("--runs-dir", help=runs_help)


def cli_main(args: Any, runs_root: Path) -> int:
    if args.cmd == "compare":
        lines, facts = compare(runs_root, args.base, args.head, args.table, args.scale, args.metric,
                               args.allow_device_mismatch)
        print(format_text(lines, facts), end="")
        if args.markdown:
            from repro.io import atomic_write_text

            print(f"markdown: {atomic_write_text(args.markdown, format_markdown(lines, facts))}")
        return 1 if args.fail_on_regression and regressions(lines) else 0
    hist = history(runs_root, args.metric, args.table, args.row, args.scale)
    print(format_history(args.metric, hist), end="")
    out = history_plot_path(args.plots_dir, args.metric, args.table, args.row)
    print(f"plot: {plot_history(args.metric, hist, out)}")
    return 0
