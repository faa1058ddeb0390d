"""`repro run --commit REV TABLE...`: run tables with another commit's code, on this machine.

The revision is checked out into a temporary ``git worktree`` (detached; removed afterwards) and its own `repro run`
runs there (``PYTHONPATH`` = the worktree, so its package is the one imported), with the same data cache
(``REPRO_CACHE``) and its stage folders under ``<runs>/commits/<sha12>/``: a stage whose configuration did not change
between the commits has the same key, so sharing the stage folders would reuse HEAD's result instead of measuring the
other commit. The results store at ``<runs>`` then collects them, and `repro compare` sees both sides.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from repro.config import ConfigError
from repro.record.store import REPO, git, ingest_quietly, resolve_revision


def strip_options(argv: Sequence[str], options: Sequence[str]) -> list[str]:
    """``argv`` without the options named (``--opt VALUE`` and ``--opt=VALUE``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in options:
            skip = True
            continue
        if any(a.startswith(o + "=") for o in options):
            continue
        out.append(a)
    return out


def commit_runs_root(runs_root: Path, sha: str) -> Path:
    return Path(runs_root) / "commits" / sha[:12]


def run_at_commit(rev: str, argv: Sequence[str], runs_root: Path) -> int:
    """Run ``repro`` with ``argv`` (a `repro run` command line without --commit / --runs-dir) at revision ``rev``."""
    sha = resolve_revision(rev)
    out_root = commit_runs_root(runs_root, sha)
    env = dict(os.environ)
    env.setdefault("REPRO_CACHE", str(Path.home() / ".cache" / "repro"))
    with tempfile.TemporaryDirectory(prefix=f"repro-{sha[:10]}-") as tmp:
        wt = Path(tmp) / "src"
        if git("worktree", "add", "--detach", str(wt), sha) is None:
            raise ConfigError(f"git worktree add failed for {rev} ({sha[:10]}); is another worktree of it in use?")
        try:
            env["PYTHONPATH"] = os.pathsep.join([str(wt), *filter(None, [env.get("PYTHONPATH")])])
            cmd = [sys.executable, "-m", "repro", *argv, "--runs-dir", str(out_root), "--no-report"]
            print(f"repro run at {rev} = {sha[:10]} (worktree {wt}); stage folders under {out_root}", flush=True)
            rc = subprocess.call(cmd, cwd=wt, env=env)
        finally:
            git("worktree", "remove", "--force", str(wt), cwd=REPO)
            git("worktree", "prune", cwd=REPO)
    print(ingest_quietly(runs_root))
    return rc
