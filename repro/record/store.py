"""The results store: an embedded SQLite database (``<runs>/store.sqlite``) holding every finished stage of every
commit, filled by a collector from the result files.

Jobs never touch the database: they keep writing ``result.json`` atomically into their stage folders, and the
collector (``ingest``, run by `repro run`, `repro report`, `repro compare`, `repro history` and `repro bench`) reads
them. A result is keyed by its stage folder (relative to the runs root) and the SHA-256 of its bytes, so ingesting
twice changes nothing, and a stage re-run at another commit is a new row. A file that does not parse (corrupt,
half-written by a non-atomic writer) is reported and skipped, never ingested. Table manifests
(``<runs>/<scale>/tables/<paper>/<id>.json``) map stage folders to table rows; the store keeps every mapping it has
seen, so the manifests of several runs (e.g. one per seed) all count.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repro.config import ConfigError
from repro.pipeline.stage import RESULT

STORE = "store.sqlite"
SCHEMA_VERSION = 1
# Accounting fields kept as columns (and compared as cost: ratios, device named).
COST = ("device_hours", "images_per_s", "step_time_s", "peak_memory_mb", "flops_per_image", "wall_s")
_SKIP_DIRS = {"checkpoints", "slurm", "tables", "__pycache__"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS stages (
    id INTEGER PRIMARY KEY,
    folder TEXT NOT NULL,              -- stage folder relative to the runs root, e.g. tiny/linear/mae-0123456789
    content_hash TEXT NOT NULL,        -- sha256 of result.json's bytes
    stage_key TEXT, kind TEXT, recipe TEXT, label TEXT, scale TEXT, seed INTEGER,
    commit_sha TEXT, dirty INTEGER, results_version TEXT,
    device TEXT, device_name TEXT, host TEXT,
    device_hours REAL, images_per_s REAL, step_time_s REAL, peak_memory_mb REAL, flops_per_image REAL, wall_s REAL,
    init_folder TEXT,                  -- the input stage (pretraining) folder of an evaluation, relative
    config TEXT,                       -- the resolved configuration (json)
    finished REAL, ingested REAL,
    UNIQUE (folder, content_hash)
);
CREATE TABLE IF NOT EXISTS metrics (
    stage_id INTEGER NOT NULL REFERENCES stages(id), name TEXT NOT NULL, value REAL,
    PRIMARY KEY (stage_id, name)
);
CREATE TABLE IF NOT EXISTS table_rows (
    folder TEXT NOT NULL, table_id TEXT NOT NULL, row_label TEXT NOT NULL, row_index INTEGER, kind TEXT NOT NULL,
    overrides TEXT NOT NULL,           -- the run's overrides without seed=..., json list
    PRIMARY KEY (folder, table_id, row_label, kind, overrides)
);
CREATE INDEX IF NOT EXISTS stages_commit ON stages (commit_sha);
CREATE INDEX IF NOT EXISTS stages_folder ON stages (folder);
"""


def store_path(runs_root: str | Path) -> Path:
    return Path(runs_root) / STORE


@contextlib.contextmanager
def connect(runs_root: str | Path, create: bool = True) -> Iterator[sqlite3.Connection]:
    """An open store (WAL journal, waits for a concurrent writer); refuses a store of a newer schema with one line."""
    path = store_path(runs_root)
    if not create and not path.is_file():
        raise ConfigError(f"no results store at {path}; run `repro run ...` or `repro report` first")
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA busy_timeout=60000")
        con.execute("BEGIN IMMEDIATE")
        for statement in _statements():
            con.execute(statement)
        row = con.execute("SELECT max(version) FROM schema_version").fetchone()
        if row[0] is None:
            con.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
        elif row[0] > SCHEMA_VERSION:
            con.execute("ROLLBACK")
            raise ConfigError(f"the results store {path} has schema version {row[0]}, newer than this code's "
                              f"{SCHEMA_VERSION}; update repro (or use another runs folder)")
        con.execute("COMMIT")
        yield con
    finally:
        con.close()


def _statements() -> list[str]:
    body = "\n".join(line.split("--")[0] for line in _SCHEMA.splitlines())
    return [s.strip() for s in body.split(";") if s.strip()]


# ------------------------------------------------------------------------------------------------------- collector
@dataclass
class IngestReport:
    added: int = 0
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: why" for corrupt / half-written files
    mappings: int = 0

    def line(self) -> str:
        out = f"results store: {self.added} new result(s), {self.unchanged} already stored"
        if self.skipped:
            out += f", {len(self.skipped)} skipped (corrupt or half-written: {'; '.join(self.skipped[:3])}" + (
                " ...)" if len(self.skipped) > 3 else ")")
        return out


def _rel(runs_root: Path, folder: str | Path) -> str:
    """A stage folder relative to the runs root (its last three parts if it lies elsewhere: scale/kind/name)."""
    p = Path(folder)
    with contextlib.suppress(ValueError):
        return p.resolve().relative_to(runs_root.resolve()).as_posix()
    return Path(*p.parts[-3:]).as_posix()


def _walk(runs_root: Path) -> tuple[list[Path], list[Path]]:
    """Result files and table manifests (``<scale>/tables/<paper>/<id>.json``) anywhere under the runs root (also
    in the folders of `repro run --commit` and `repro bench`)."""
    results, manifests = [], []
    for dirpath, dirnames, filenames in os.walk(runs_root):
        if "tables" in dirnames and Path(dirpath).name in ("tiny", "paper"):
            manifests += sorted((Path(dirpath) / "tables").glob("*/*.json"))
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        if RESULT in filenames:
            results.append(Path(dirpath) / RESULT)
    return results, manifests


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def stage_row(runs_root: Path, path: Path, data: bytes, r: Mapping[str, Any]) -> dict[str, Any]:
    """The stages-table row of one parsed result file."""
    prov, acct, cfg = r.get("provenance") or {}, r.get("accounting") or {}, r.get("config") or {}
    init = (r.get("inputs") or {}).get("init")
    return {
        "folder": _rel(runs_root, path.parent), "content_hash": hashlib.sha256(data).hexdigest(),
        "stage_key": r.get("key"), "kind": r.get("kind"), "recipe": r.get("recipe") or cfg.get("recipe"),
        "label": r.get("label"), "scale": r.get("scale") or cfg.get("scale"),
        "seed": prov.get("seed", cfg.get("seed")), "commit_sha": prov.get("commit"),
        "dirty": None if prov.get("dirty") is None else int(bool(prov.get("dirty"))),
        "results_version": json.dumps(prov.get("results_version") or {}, sort_keys=True),
        "device": acct.get("device"), "device_name": prov.get("device_name"), "host": prov.get("host"),
        **{c: _num(acct.get(c)) for c in COST},
        "init_folder": _rel(runs_root, init) if init else None,
        "config": json.dumps(cfg, sort_keys=True, default=str), "finished": _num(r.get("finished")),
        "ingested": time.time(),
    }


def ingest(runs_root: str | Path) -> IngestReport:
    """Collect every finished stage's result and every table manifest under ``runs_root`` into the store.
    Idempotent; safe while jobs are writing (they write atomically; a file that does not parse is skipped and
    reported, and picked up by a later call once it is whole)."""
    root = Path(runs_root)
    rep = IngestReport()
    with connect(root) as con:
        known = {(f, h) for f, h in con.execute("SELECT folder, content_hash FROM stages")}
        rows, metrics = [], []
        result_files, manifest_files = _walk(root)
        for path in result_files:
            try:
                data = path.read_bytes()
                r = json.loads(data)
                if not isinstance(r, dict):
                    raise ValueError("not an object")
            except FileNotFoundError:
                continue
            except (OSError, ValueError, UnicodeDecodeError) as e:
                rep.skipped.append(f"{path}: {type(e).__name__}")
                continue
            if r.get("status") != "done":
                continue
            row = stage_row(root, path, data, r)
            if (row["folder"], row["content_hash"]) in known:
                rep.unchanged += 1
                continue
            known.add((row["folder"], row["content_hash"]))
            rows.append(row)
            metrics.append({k: _num(v) for k, v in (r.get("metrics") or {}).items() if _num(v) is not None})
        maps = []
        for m in manifest_files:
            with contextlib.suppress(OSError, ValueError):
                man = json.loads(m.read_text())
                ov = json.dumps([o for o in man.get("overrides", []) if not str(o).startswith("seed=")])
                for i, entry in enumerate(man.get("rows", [])):
                    for kind, ds in (entry.get("stages") or {}).items():
                        for d in [ds] if isinstance(ds, str) else ds:  # one folder per seed (old form: one string)
                            maps.append((_rel(root, d), man["table"], entry["label"], i, kind, ov))
        con.execute("BEGIN IMMEDIATE")
        try:
            cols = list(rows[0]) if rows else []
            for row, mets in zip(rows, metrics):
                cur = con.execute(f"INSERT OR IGNORE INTO stages ({', '.join(cols)}) VALUES "
                                  f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
                if cur.rowcount == 1:  # another collector may have stored it meanwhile
                    rep.added += 1
                    con.executemany("INSERT INTO metrics VALUES (?, ?, ?)",
                                    [(cur.lastrowid, k, v) for k, v in sorted(mets.items())])
                else:
                    rep.unchanged += 1
            before = con.total_changes
            con.executemany("INSERT OR IGNORE INTO table_rows VALUES (?, ?, ?, ?, ?, ?)", maps)
            rep.mappings = con.total_changes - before
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return rep


def ingest_quietly(runs_root: str | Path) -> str:
    """``ingest`` for `repro run` / `report`: one line, never an exception for a store problem (results stay on
    disk)."""
    if not Path(runs_root).is_dir():
        return f"results store: nothing to collect ({runs_root} does not exist)"
    try:
        return ingest(runs_root).line()
    except (sqlite3.Error, OSError, ConfigError) as e:
        return f"results store: not updated ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


# -------------------------------------------------------------------------------------------------------- reading
def records(runs_root: str | Path, scale: str | None = None) -> list[dict[str, Any]]:
    """One record per stored (stage result, table row) pair, with its metrics, newest result per (commit, dirty,
    folder).
    Stages in no table get ``table_id`` None."""
    with connect(runs_root, create=False) as con:
        con.row_factory = sqlite3.Row
        q = ("SELECT s.*, t.table_id, t.row_label, t.row_index, t.overrides FROM stages s "
             "LEFT JOIN table_rows t ON t.folder = s.folder AND t.kind = s.kind")
        args: list[Any] = []
        if scale:
            q += " WHERE s.scale = ?"
            args.append(scale)
        rows = [dict(r) for r in con.execute(q + " ORDER BY s.finished, s.id", args)]
        mets: dict[int, dict[str, float]] = {}
        for sid, name, value in con.execute("SELECT stage_id, name, value FROM metrics"):
            mets.setdefault(sid, {})[name] = value
    latest: dict[tuple, dict[str, Any]] = {}
    for r in rows:  # ordered by finish time: a later re-run of the same stage at the same commit replaces it
        r["metrics"] = mets.get(r["id"], {})
        latest[(r["commit_sha"], r["dirty"], r["folder"], r["table_id"], r["row_label"], r["overrides"])] = r
    return list(latest.values())


def finished_results(runs_root: str | Path) -> list[dict[str, Any]]:
    """The finished results in the stage folders now under ``runs_root`` (``<scale>/<kind>/<stage>/result.json``),
    each with its folder as ``_dir``: what the report renders. A file that does not parse is skipped."""
    out = []
    for p in sorted(Path(runs_root).glob(f"*/*/*/{RESULT}")):
        try:
            r = json.loads(p.read_text())
        except json.JSONDecodeError:
            continue
        if r.get("status") == "done":
            r["_dir"] = str(p.parent)
            out.append(r)
    return out


def tabled_folders(runs_root: str | Path) -> set[str]:
    """Stage folders (relative to the runs root) that a table manifest listed in any run the store collected: every
    table stage, including those a later code or recipe change superseded. Empty without a readable store."""
    if not store_path(runs_root).is_file():
        return set()
    try:
        with connect(runs_root, create=False) as con:
            return {f for (f,) in con.execute("SELECT DISTINCT folder FROM table_rows")}
    except (sqlite3.Error, ConfigError):
        return set()


def commits(runs_root: str | Path) -> list[str]:
    with connect(runs_root, create=False) as con:
        return [c for (c,) in con.execute("SELECT DISTINCT commit_sha FROM stages WHERE commit_sha IS NOT NULL")]


REPO = Path(__file__).resolve().parents[2]  # the git repository whose revisions `compare` / `history` resolve


def git(*args: str, cwd: str | Path | None = None) -> str | None:
    """A git command's stdout in the repository (None if it fails)."""
    root = cwd or REPO
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def resolve_revision(rev: str) -> str:
    """The full commit id of a git revision (``HEAD~2``, a branch, a short id); one line if git does not know it."""
    if rev.startswith("-"):
        raise ConfigError(f"revision {rev!r} is not a git revision")
    sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if not sha:
        raise ConfigError(f"unknown revision {rev!r}: git rev-parse does not know it (a commit id, branch or tag)")
    return sha
