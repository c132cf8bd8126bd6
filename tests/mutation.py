"""`make mutation`: how many wrong versions of the papers' equations do our tests catch?

Mutation testing (cosmic-ray, PyPI): every small change an operator can make to a module (`+` -> `-`, `<` -> `<=`,
a constant 2 -> 3, a `not` removed, a `break` -> `continue`, ...) is one *mutant*; the module's fast tests run on
each. A mutant the tests fail on is *killed*; one they pass is a *survivor*: either a test is missing, or the change
does not alter behaviour (an *equivalent* mutant, e.g. `x * 1` -> `x / 1`). The score is killed / (killed + survived)
per module; the target is >= 85%. Survivors are listed with their diffs for a person to judge.

    python tests/mutation.py                      # every module below; hours on 2 cores; resumes where it stopped
    python tests/mutation.py --modules rope layers --out_dir runs/mutation --jobs 2   # two modules at once
    python tests/mutation.py --summary            # the table so far (pending mutants counted), running nothing

The mutants never touch your checkout: the tracked files (as they are on disk, uncommitted changes included) are
copied to <out_dir>/trees/<module>, one copy per module (cosmic-ray rewrites the module's file in place, and another
module's tests import it), and the tests run there with that copy first on PYTHONPATH. Each module's cosmic-ray
session (<out_dir>/<name>.sqlite) resumes; it starts again when the module or its tests change. The results go to
<out_dir>/MUTATION.md (the table the README quotes) and <out_dir>/<name>_survivors.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.85


@dataclass(frozen=True)
class Target:
    """One module that implements a paper's equations, and the fast tests that should catch every change to it."""

    name: str
    module: str
    tests: tuple[str, ...]


TARGETS = (
    Target("rope", "x_llama/x_llama/rope.py", ("tests/x_llama/test_rope.py",)),
    Target("layers", "shared/axon_shared/layers.py", ("tests/shared/test_layers.py",)),
    Target("generation", "x_llama/x_llama/generation.py", ("tests/x_llama/test_cache_generate.py",)),
    Target("decoding", "transformer/transformer/decoding.py", ("tests/transformer/test_decoding.py",)),
    Target("diffusion", "dali_ddpm/dali_ddpm/diffusion.py", ("tests/dali_ddpm/test_diffusion.py",)),
    Target("losses", "instructgpt_rlhf/instructgpt_rlhf/losses.py", ("tests/instructgpt_rlhf/test_losses.py",)),
)


def copy_tree(tree: Path) -> Path:
    """The tracked files as they are on disk, copied to `tree` (files that no longer exist are removed)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    wanted = {f for f in files if f and (ROOT / f).is_file()}
    if tree.exists():
        for path in sorted(tree.rglob("*"), reverse=True):
            relative = path.relative_to(tree).as_posix()
            if path.is_file() and relative not in wanted and "__pycache__" not in relative:
                path.unlink()
    for relative in wanted:
        source, target = ROOT / relative, tree / relative
        if not target.exists() or target.read_bytes() != source.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return tree


def environment(tree: Path) -> dict[str, str]:
    """The tree's packages first on sys.path (ahead of the editable installs of the checkout), one torch thread."""
    packages = [str(p.parent) for p in sorted(tree.glob("*/pyproject.toml"))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*packages, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MPLBACKEND", "Agg")
    return env


def fingerprint(tree: Path, target: Target) -> str:
    digest = hashlib.sha256()
    for relative in (target.module, *target.tests):
        digest.update((tree / relative).read_bytes())
    return digest.hexdigest()[:16]


def test_command(target: Target) -> str:
    # -x: a killed mutant stops at its first failing test; no cache: mutants must not share pytest state
    return f"{sys.executable} -m pytest -x -q -p no:cacheprovider {' '.join(target.tests)}"


def run_target(target: Target, out_dir: Path, summary_only: bool = False) -> dict:
    """Baseline (the tests must pass unmutated, and set the timeout), then every mutant of the module; resumable.
    summary_only: only read what the session holds so far."""
    session, config, stamp = out_dir / f"{target.name}.sqlite", out_dir / f"{target.name}.toml", out_dir / f"{target.name}.stamp"
    cosmic_ray = [sys.executable, "-m", "cosmic_ray.cli"]
    tree = out_dir / "trees" / target.name
    if summary_only:
        if not session.exists():
            return summarise(target, [], out_dir)
        dump = subprocess.run([*cosmic_ray, "dump", str(session)], cwd=out_dir, check=True, capture_output=True, text=True)
        return summarise(target, [json.loads(line) for line in dump.stdout.splitlines() if line.strip()], out_dir)
    copy_tree(tree)
    env = environment(tree)
    start = time.perf_counter()
    baseline = subprocess.run(test_command(target), shell=True, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if baseline.returncode != 0:
        raise SystemExit(f"{target.name}: the tests fail before any mutation, fix them first:\n{baseline.stdout[-3000:]}")
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{tree / target.module}"\n'
        f"timeout = {max(30.0, 4 * seconds):.0f}\n"
        "excluded-modules = []\n"
        f'test-command = "{test_command(target)}"\n\n'
        '[cosmic-ray.distributor]\nname = "local"\n'
    )
    if not session.exists() or not stamp.exists() or stamp.read_text() != fingerprint(tree, target):
        session.unlink(missing_ok=True)
        subprocess.run([*cosmic_ray, "init", str(config), str(session)], cwd=tree, env=env, check=True)
        stamp.write_text(fingerprint(tree, target))
    print(f"{target.name}: {target.module}, tests {seconds:.0f} s unmutated", flush=True)
    subprocess.run([*cosmic_ray, "exec", str(config), str(session)], cwd=tree, env=env, check=True)
    dump = subprocess.run([*cosmic_ray, "dump", str(session)], cwd=tree, env=env, check=True, capture_output=True, text=True)
    return summarise(target, [json.loads(line) for line in dump.stdout.splitlines() if line.strip()], out_dir)


def summarise(target: Target, records: list, out_dir: Path) -> dict:
    """Counts per outcome, and the survivors written out with their diffs."""
    killed, survivors, incompetent, pending = 0, [], 0, 0
    for item, result in records:
        if result is None:
            pending += 1
        elif result.get("test_outcome") == "survived":
            survivors.append((item, result))
        elif result.get("test_outcome") == "incompetent":  # the mutant did not even import: not a test of the tests
            incompetent += 1
        else:
            killed += 1
    judged = killed + len(survivors)
    row = {
        "name": target.name,
        "module": target.module,
        "mutants": len(records),
        "killed": killed,
        "survived": len(survivors),
        "incompetent": incompetent,
        "pending": pending,
        "score": killed / judged if judged else float("nan"),
    }
    lines = [f"# Survivors of {target.module} ({len(survivors)} of {judged})", ""]
    for item, result in survivors:
        (mutation,) = item["mutations"]
        lines += [
            f"## line {mutation['start_pos'][0]} (in {mutation.get('definition_name')}): {mutation['operator_name']}",
            "",
            "```diff",
            (result.get("diff") or "").strip(),
            "```",
            "",
        ]
    (out_dir / f"{target.name}_survivors.md").write_text("\n".join(lines))
    return row


def write_table(rows: list[dict], out_dir: Path) -> None:
    lines = [
        f"| module | mutants | killed | survived | not run yet | score (target >= {TARGET:.0%}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r["score"] >= TARGET else " (below)"
        if r["pending"]:
            flag += " (partial)"
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['pending']} | {r['score']:.1%}{flag} |")
    (out_dir / "MUTATION.md").write_text("\n".join(lines) + "\n")
    (out_dir / "mutation.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", choices=[t.name for t in TARGETS], default=[t.name for t in TARGETS])
    parser.add_argument("--out_dir", default="runs/mutation")
    parser.add_argument("--jobs", type=int, default=1, help="modules mutated at once (each runs its tests on one thread)")
    parser.add_argument("--summary", action="store_true", help="only write the table of what has run so far")
    args = parser.parse_args()
    out_dir = (ROOT / args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [t for t in TARGETS if t.name in args.modules]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # the work is in subprocesses
        rows = list(pool.map(lambda t: run_target(t, out_dir, args.summary), targets))
    write_table(rows, out_dir)


if __name__ == "__main__":
    main()
