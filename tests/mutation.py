"""`make mutation`: how many wrong versions of the papers' equations do our tests catch?

Mutation testing (cosmic-ray, PyPI): every small change an operator can make to a module (`+` -> `-`, `<` -> `<=`,
a constant 2 -> 3, a `not` removed, a `break` -> `continue`, ...) is one *mutant*; the module's fast tests run on
each. A mutant the tests fail on is *killed*; one they pass is a *survivor*: either a test is missing, or the change
does not alter behaviour (an *equivalent* mutant, e.g. `x * 1` -> `x / 1`). The score is killed / (killed + survived)
per module; the target is >= 85%. Survivors are listed with their diffs for a person to judge. Mutants of a type
annotation (`Tensor | None` -> `Tensor - None`) are counted apart and left out of the score: every module here has
`from __future__ import annotations`, so annotations stay strings and such a mutant is equivalent by construction.

    python tests/mutation.py                      # every module below; hours on 2 cores; resumes where it stopped
    python tests/mutation.py --modules rope layers --out_dir runs/mutation --jobs 2   # two modules at once
    python tests/mutation.py --summary            # the table so far (pending mutants counted), running nothing
    python tests/mutation.py --sample 200         # a seeded random sample of 200 mutants per module (minutes)
    python tests/mutation.py --sample 200 --retest_survivors   # after adding tests: rerun only the survivors

The mutants never touch your checkout: the tracked files (as they are on disk, uncommitted changes included) are
copied to <out_dir>/trees/<module>, one copy per module (cosmic-ray rewrites the module's file in place, and another
module's tests import it), and the tests run there with that copy first on PYTHONPATH. Each module's cosmic-ray
session (<out_dir>/<name>.sqlite) resumes; it starts again when the module or its tests change. The results go to
<out_dir>/MUTATION.md (the table the README quotes) and <out_dir>/<name>_survivors.md.

--sample n runs a seeded uniform random sample of n mutants per module (the others are marked skipped in the
session); the table then gives the sample's score with its 95% Wilson interval, an estimate of the full score.
--retest_survivors, when only the tests changed (the module and the sample did not), reruns the survivors alone
instead of starting the session again: valid when tests were added or made stricter, never removed, since a mutant
the old tests killed is then still killed.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import shutil
import sqlite3
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
    pytest_args: str = ""  # e.g. a -k expression leaving out slow checks that test another code path


TARGETS = (
    Target("rope", "x_llama/x_llama/rope.py", ("tests/x_llama/test_rope.py",)),
    # the compiled-vs-eager checks (30 s of compiling) test torch.compile, not the formulas; the eager tests cover them
    Target("layers", "shared/axon_shared/layers.py", ("tests/shared/test_layers.py",), "-k 'not compiled'"),
    # the CLI test: `x-llama generate`'s own checks of the prompt length live in generation.py; test_decode_step:
    # generate(compile=True) (its graph comes from inductor's on-disk cache after the first mutant)
    Target(
        "generation",
        "x_llama/x_llama/generation.py",
        (
            "tests/x_llama/test_cache_generate.py",
            "tests/x_llama/test_decode_step.py",
            "tests/x_llama/test_train.py::test_cli_train_generate_evaluate",
        ),
    ),
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


def fingerprint(tree: Path, target: Target, sample: int | None) -> str:
    digest = hashlib.sha256(f"{target.pytest_args}|sample={sample}".encode())
    for relative in (target.module, *target.tests):
        digest.update((tree / relative.split("::")[0]).read_bytes())
    return digest.hexdigest()[:16]


def test_command(target: Target) -> str:
    # -x: a killed mutant stops at its first failing test; no cache: mutants must not share pytest state
    return f"{sys.executable} -m pytest -x -q -p no:cacheprovider {' '.join(target.tests)} {target.pytest_args}".rstrip()


def keep_a_sample(session: Path, sample: int, seed: int = 0) -> None:
    """Mark all but a seeded uniform random sample of `sample` mutants as skipped (cosmic-ray's filters do the same)."""
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult

    with use_db(str(session), WorkDB.Mode.open) as db:
        job_ids = sorted(item.job_id for item in db.work_items)
        kept = set(random.Random(seed).sample(job_ids, min(sample, len(job_ids))))
        for job_id in job_ids:
            if job_id not in kept:
                db.set_result(job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED, output="not in the sample"))


def forget_survivors(session: Path, module_source: str) -> int:
    """Delete the survivors' results so that `exec` runs them again, except the annotation-only ones (no test can
    kill those); returns how many will run."""
    spans = annotation_spans(module_source)
    with sqlite3.connect(session) as db:
        rows = db.execute(
            "SELECT r.job_id, m.start_pos_row, m.start_pos_col FROM work_results r JOIN mutation_specs m ON r.job_id = m.job_id "
            "WHERE r.test_outcome = 'SURVIVED'"
        ).fetchall()
        rerun = [(job_id,) for job_id, row, col in rows if not any(start <= (row, col) < end for start, end in spans)]
        db.executemany("DELETE FROM work_results WHERE job_id = ?", rerun)
    return len(rerun)


def same_sample(session: Path, sample: int | None) -> bool:
    """Whether the session runs the mutants `--sample sample` picks (the sample is seeded, so its size decides)."""
    with sqlite3.connect(session) as db:
        total = db.execute("SELECT COUNT(*) FROM work_items").fetchone()[0]
        skipped = db.execute("SELECT COUNT(*) FROM work_results WHERE worker_outcome = 'SKIPPED'").fetchone()[0]
    return total - skipped == (total if sample is None else min(sample, total))


def run_target(
    target: Target, out_dir: Path, summary_only: bool = False, sample: int | None = None, retest_survivors: bool = False
) -> dict:
    """Baseline (the tests must pass unmutated, and set the timeout), then every mutant of the module (or a sample of
    them); resumable. summary_only: only read what the session holds so far."""
    session, config, stamp = out_dir / f"{target.name}.sqlite", out_dir / f"{target.name}.toml", out_dir / f"{target.name}.stamp"
    cosmic_ray = [sys.executable, "-m", "cosmic_ray.cli"]
    tree = out_dir / "trees" / target.name
    if summary_only:
        if not session.exists():
            return summarise(target, [], out_dir)
        dump = subprocess.run([*cosmic_ray, "dump", str(session)], cwd=out_dir, check=True, capture_output=True, text=True)
        return summarise(target, [json.loads(line) for line in dump.stdout.splitlines() if line.strip()], out_dir)
    # the module as the session mutates it (the tree's copy is rewritten in place while mutants run)
    pristine = out_dir / f"{target.name}.module.py"
    module_before = pristine.read_bytes() if pristine.exists() else None
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
    only_tests_changed = (
        session.exists()
        and stamp.exists()
        and stamp.read_text() != fingerprint(tree, target, sample)
        and module_before == (tree / target.module).read_bytes()
        and same_sample(session, sample)
    )
    shutil.copy2(tree / target.module, pristine)
    if retest_survivors and only_tests_changed:
        print(
            f"{target.name}: the tests changed, the module did not: {forget_survivors(session, (tree / target.module).read_text())} survivors rerun",
            flush=True,
        )
        stamp.write_text(fingerprint(tree, target, sample))
    elif not session.exists() or not stamp.exists() or stamp.read_text() != fingerprint(tree, target, sample):
        session.unlink(missing_ok=True)
        subprocess.run([*cosmic_ray, "init", str(config), str(session)], cwd=tree, env=env, check=True)
        if sample is not None:
            keep_a_sample(session, sample)
        stamp.write_text(fingerprint(tree, target, sample))
    print(f"{target.name}: {target.module}, tests {seconds:.0f} s unmutated", flush=True)
    subprocess.run([*cosmic_ray, "exec", str(config), str(session)], cwd=tree, env=env, check=True)
    dump = subprocess.run([*cosmic_ray, "dump", str(session)], cwd=tree, env=env, check=True, capture_output=True, text=True)
    return summarise(target, [json.loads(line) for line in dump.stdout.splitlines() if line.strip()], out_dir)


def annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) (line, column) of every type annotation, if the module postpones their evaluation (PEP 563);
    otherwise none, since a mutated annotation is then evaluated at import and can fail."""
    tree = ast.parse(source)
    postponed = any(
        isinstance(node, ast.ImportFrom) and node.module == "__future__" and any(a.name == "annotations" for a in node.names)
        for node in tree.body
    )
    if not postponed:
        return []
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            annotations.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    return [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in annotations]


def summarise(target: Target, records: list, out_dir: Path) -> dict:
    """Counts per outcome, and the survivors written out with their diffs."""
    pristine = out_dir / f"{target.name}.module.py"
    spans = annotation_spans(pristine.read_text()) if pristine.exists() else []
    killed, survivors, incompetent, pending, skipped, in_annotations = 0, [], 0, 0, 0, 0
    for item, result in records:
        (mutation,) = item["mutations"]
        if result is not None and result.get("worker_outcome") == "skipped":  # not in the sample
            skipped += 1
        elif any(start <= tuple(mutation["start_pos"]) < end for start, end in spans):
            in_annotations += 1
        elif result is None:
            pending += 1
        elif result.get("test_outcome") == "survived":
            survivors.append((item, result))
        elif result.get("test_outcome") == "incompetent":  # the mutant did not even import: not a test of the tests
            incompetent += 1
        else:
            killed += 1
    judged = killed + len(survivors)
    low, high = wilson_interval(killed, judged)
    row = {
        "name": target.name,
        "module": target.module,
        "mutants": len(records),
        "sampled": len(records) - skipped,
        "annotation_only": in_annotations,
        "killed": killed,
        "survived": len(survivors),
        "incompetent": incompetent,
        "pending": pending,
        "score": killed / judged if judged else float("nan"),
        "interval": [low, high],
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


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (the full module's score, estimated from a sample)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def write_table(rows: list[dict], out_dir: Path) -> None:
    lines = [
        f"| module | mutants | run | annotation-only | killed | survived | not run yet | score (target >= {TARGET:.0%}) | 95% interval |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = "" if r["score"] >= TARGET else " (below)"
        if r["pending"]:
            flag += " (partial)"
        low, high = r["interval"]
        lines.append(
            f"| `{r['module']}` | {r['mutants']} | {r['sampled']} | {r['annotation_only']} | {r['killed']} | {r['survived']} | {r['pending']} "
            f"| {r['score']:.1%}{flag} | {low:.0%}-{high:.0%} |"
        )
    (out_dir / "MUTATION.md").write_text("\n".join(lines) + "\n")
    (out_dir / "mutation.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="+", choices=[t.name for t in TARGETS], default=[t.name for t in TARGETS])
    parser.add_argument("--out_dir", default="runs/mutation")
    parser.add_argument("--jobs", type=int, default=1, help="modules mutated at once (each runs its tests on one thread)")
    parser.add_argument("--summary", action="store_true", help="only write the table of what has run so far")
    parser.add_argument("--sample", type=int, default=None, help="run a seeded random sample of this many mutants per module")
    parser.add_argument("--retest_survivors", action="store_true", help="tests were only added: rerun the survivors alone")
    args = parser.parse_args()
    out_dir = (ROOT / args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [t for t in TARGETS if t.name in args.modules]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # the work is in subprocesses
        rows = list(pool.map(lambda t: run_target(t, out_dir, args.summary, args.sample, args.retest_survivors), targets))
    write_table(rows, out_dir)


if __name__ == "__main__":
    main()
