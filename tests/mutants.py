"""Mutation check: every planted one-line bug below must make a test fail.

    python -m tests.mutants               # all mutations, then the table; exit 1 unless all are caught
    python -m tests.mutants NAME [NAME..] # only these
    python -m tests.mutants --list        # names, files and the tests each one runs

Each mutation replaces one exact piece of text (it must occur exactly once in
its file) in a temporary copy of the working tree (without .git) and runs only
the tests listed for it, with `-x -q`, in a subprocess whose `tbhvae` is the
copy's (PYTHONPATH points at the copy; the subprocess checks `tbhvae.__file__`
before it starts pytest). First the same tests run once on the unmutated copy,
so that a test that already fails cannot count as a catch (`--no-baseline`
skips this).

Status of a mutation: "caught" (a test failed; the table names the first
one), "SURVIVED" (the tests passed), "NOT FOUND" / "AMBIGUOUS" (its original
text is not in the file exactly once: the code moved, update the entry),
"BROKEN" (pytest could not collect or run, e.g. a syntax error) or "TIMEOUT".
The exit status is 0 only when every mutation is caught.

Keep the list current when code moves: a mutation whose text is gone fails
the check instead of silently passing.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_IGNORED = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.egg-info", "runs", "build", "dist")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # exact text, present exactly once in `file`
    replacement: str
    tests: tuple[str, ...]  # pytest paths or node ids, relative to the repository root
    select: str = ""  # pytest -k expression ("" = every test in `tests`)
    why: str = ""

    def __post_init__(self):
        assert self.original != self.replacement and self.tests, self.name

    def located(self, root: Path) -> int:
        """How often the original text occurs in the file under `root` (it must be exactly once)."""
        path = root / self.file
        return path.read_text().count(self.original) if path.is_file() else 0


MUTATIONS = (
    # ---- the bugs planted in issue 13 ------------------------------------------------------------
    Mutation("tc_sign_flipped", "tbhvae/objectives.py",
             '+ beta * tf.nn.relu(terms["total_correlation"] - floor)',
             '- beta * tf.nn.relu(terms["total_correlation"] - floor)',
             ("tests/test_objectives.py", "tests/test_models.py"), "penalty or composition",
             "the total correlation rewarded instead of penalised"),
    Mutation("geco_value_trick_dropped", "tbhvae/bottlenecks.py",
             "return constraint + tf.stop_gradient(average - constraint), constraint",
             "return constraint, constraint",
             ("tests/test_models.py",), "composition or geco",
             "GECO loss lambda * C: the moving average no longer gives the constraint its value"),
    Mutation("replica_scaling_dropped", "tbhvae/models.py",
             "scaled_actor = losses.actor / num_replicas + losses.actor_sum",
             "scaled_actor = losses.actor + losses.actor_sum",
             ("tests/test_training.py",), "replica_step",
             "gradients summed over replicas without the 1 / replicas of mean-type terms"),
    Mutation("critic_replica_scaling_dropped", "tbhvae/models.py",
             "scaled_critic = losses.critic / num_replicas",
             "scaled_critic = losses.critic",
             ("tests/test_training.py",), "replica_step",
             "the critics' gradients summed over replicas without the 1 / replicas"),
    Mutation("geco_mse_summed_over_replicas", "tbhvae/models.py",
             'global_mse = replica.all_reduce("sum", out.mse) / num_replicas if replica else out.mse',
             'global_mse = replica.all_reduce("sum", out.mse) if replica else out.mse',
             ("tests/test_training.py",), "replica_step",
             "GECO updated from the sum of the replicas' MSEs instead of their mean"),
    Mutation("resume_restarts_at_batch_0", "tbhvae/train/loop.py",
             "train_dataset(feature_set.train_features, config.batch_size, config.seed, start_step)",
             "train_dataset(feature_set.train_features, config.batch_size, config.seed, 0)",
             ("tests/test_training.py",), "resume",
             "a resumed run feeds batches 0, 1, ... again instead of continuing"),
    Mutation("pipeline_ignores_start_step", "tbhvae/train/loop.py",
             "tf.data.Dataset.counter(start_step, dtype=tf.int64)",
             "tf.data.Dataset.counter(0, dtype=tf.int64)",
             ("tests/test_training.py",), "pipeline",
             "train_dataset(start_step=s) starts at batch 0"),
    Mutation("bit_balance_max", "tbhvae/evaluation.py",
             '"bit_balance": float(balance.mean())',
             '"bit_balance": float(balance.max())',
             ("tests/test_evaluation.py",), "code_statistics",
             "bit balance aggregated with max instead of mean"),
    # ---- one per objective term ------------------------------------------------------------------
    Mutation("mutual_information_wrong_term", "tbhvae/objectives.py",
             '"mutual_information": tf.reduce_mean(log_q_conditional - log_q_joint)',
             '"mutual_information": tf.reduce_mean(log_q_conditional - log_q_marginals)',
             ("tests/test_objectives.py",), "",
             "MI against the product of marginals instead of the aggregate posterior"),
    Mutation("mss_weights_wrong", "tbhvae/objectives.py",
             "weights = (eye / n + next_one * (n - m) / (n * m)",
             "weights = (eye / n + next_one / m",
             ("tests/test_objectives.py",), "",
             "minibatch-stratified importance weights without the (N - M) / (N M) element"),
    Mutation("dimensionwise_kl_without_prior", "tbhvae/objectives.py",
             "dimensionwise_kl = tf.reduce_mean(log_q_marginals - log_prior)",
             "dimensionwise_kl = tf.reduce_mean(log_q_marginals)",
             ("tests/test_objectives.py",), "",
             "estimator dimension-wise KL without log p(b)"),
    Mutation("dimensionwise_kl_batch_mean_sign", "tbhvae/objectives.py",
             "dimensionwise_kl = -log_prior - _bernoulli_entropy_sum(mean_probs)",
             "dimensionwise_kl = log_prior + _bernoulli_entropy_sum(mean_probs)",
             ("tests/test_objectives.py",), "",
             "closed-form (batch-mean) dimension-wise KL with the wrong sign: rewards unbalanced bits"),
    Mutation("tc_floor_not_clipped", "tbhvae/objectives.py",
             "return tf.nn.relu(tf.cast(bits, tf.float32) * math.log(2.0) - tf.math.log(tf.cast(support, tf.float32)))",
             "return (tf.cast(bits, tf.float32) * math.log(2.0) - tf.math.log(tf.cast(support, tf.float32)))",
             ("tests/test_objectives.py",), "floor or known_code_sets",
             "a negative TC floor when the support holds every code (2^M < S)"),
    Mutation("tc_floor_support_of_mws", "tbhvae/bottlenecks.py",
             'support = self.dataset_size if config.tc_estimator == "mss" else tf.shape(out.codes)[0]',
             "support = self.dataset_size",
             ("tests/test_models.py",), "floor",
             "the MWS estimator's floor computed from N although its q(b) has support B"),
    Mutation("similarity_without_variance", "tbhvae/objectives.py",
             "return tf.reduce_sum((error + variance) * off_diagonal) / pairs",
             "return tf.reduce_sum(error * off_diagonal) / pairs",
             ("tests/test_objectives.py",), "similarity",
             "the similarity loss ignores the posterior's noise (Var[s_ij])"),
    Mutation("decorrelation_keeps_diagonal", "tbhvae/objectives.py",
             "off_diagonal = moments - tf.linalg.diag(tf.linalg.diag_part(moments))",
             "off_diagonal = moments",
             ("tests/test_objectives.py",), "decorrelation",
             "the decorrelation loss penalises each bit's own second moment"),
    Mutation("gaussian_kl_mean_over_dims", "tbhvae/objectives.py",
             "return tf.reduce_mean(tf.reduce_sum(kl, axis=1))",
             "return tf.reduce_mean(kl)",
             ("tests/test_objectives.py",), "gaussian_kl",
             "Gaussian KL averaged over dimensions instead of summed"),
    Mutation("adversarial_fake_label", "tbhvae/objectives.py",
             "fake = tf.nn.sigmoid_cross_entropy_with_logits(tf.zeros_like(fake_logits), fake_logits)",
             "fake = tf.nn.sigmoid_cross_entropy_with_logits(tf.ones_like(fake_logits), fake_logits)",
             ("tests/test_objectives.py",), "adversarial",
             "the critic told that encoder outputs are real"),
    Mutation("adversarial_actor_sign", "tbhvae/bottlenecks.py",
             "return LossTerms(actor=-self.config.adversarial_weight * loss,",
             "return LossTerms(actor=self.config.adversarial_weight * loss,",
             ("tests/test_models.py",), "composition",
             "the encoder helps the critics instead of fooling them"),
    Mutation("similarity_term_rewarded", "tbhvae/bottlenecks.py",
             "return LossTerms(actor=self.config.similarity_weight * pairs * self.config.bits / 2.0 * loss,",
             "return LossTerms(actor=-self.config.similarity_weight * pairs * self.config.bits / 2.0 * loss,",
             ("tests/test_learning.py",), "learn",
             "the similarity term pushes code similarities away from the features' neighbourhoods"),
    # ---- layers ------------------------------------------------------------------------------------
    Mutation("hamming_adjacency_distance", "tbhvae/layers.py",
             "distance = ones[:, None] + ones[None, :] - 2.0 * tf.matmul(codes, codes, transpose_b=True)",
             "distance = ones[:, None] + ones[None, :] - tf.matmul(codes, codes, transpose_b=True)",
             ("tests/test_layers.py",), "adjacency",
             "Hamming distance without the factor 2 on the common ones"),
    Mutation("straight_through_identity", "tbhvae/layers.py",
             "return probs * (1.0 - probs) * (d_codes + d_probs), tf.zeros_like(threshold)",
             "return d_codes + d_probs, tf.zeros_like(threshold)",
             ("tests/test_layers.py",), "straight_through",
             "straight-through gradient without the sigmoid's derivative p (1 - p)"),
    # ---- tie-aware metric -------------------------------------------------------------------------
    Mutation("tie_aware_group_spread", "tbhvae/tie_aware.py",
             "spread = np.where(counts > 1, (relevant - 1) / np.maximum(counts - 1, 1), 0.0)",
             "spread = np.where(counts > 1, relevant / np.maximum(counts, 1), 0.0)",
             ("tests/test_evaluation.py",), "hand_computed or all_tie_orders",
             "complete tie groups: c_d = r_d / n_d instead of (r_d - 1) / (n_d - 1)"),
    Mutation("tie_aware_straddling_h2", "tbhvae/tie_aware.py",
             "h2 = taken - (closer + 1) * h1",
             "h2 = taken - closer * h1",
             ("tests/test_evaluation.py",), "hand_computed or all_tie_orders",
             "the group cut by K: H2 off by one position"),
    # ---- deterministic codes at test time and in exports -----------------------------------------
    Mutation("encode_threshold", "tbhvae/hashing_model.py",
             '"bits": tf.cast(logits > 0.0, tf.uint8)',
             '"bits": tf.cast(logits > 0.5, tf.uint8)',
             ("tests/test_training.py",), "deterministic",
             "test-time codes thresholded at logit 0.5 instead of 0 (p = 0.62)"),
    Mutation("export_samples_bits", "tbhvae/export/savedmodel.py",
             'outputs = {"bits": code["bits"], "packed": pack_bits(code["bits"]), "probs": code["probs"]}',
             'outputs = {"bits": tf.cast(code["probs"] > tf.random.uniform(tf.shape(code["probs"])), tf.uint8), '
             '"packed": pack_bits(code["bits"]), "probs": code["probs"]}',
             ("tests/test_serving.py",), "round_trip",
             "exported encoders sample the bits instead of thresholding"),
    # ---- int8 image encoders ---------------------------------------------------------------------
    Mutation("folded_bias_sign", "tbhvae/export/quantisation_aware.py",
             "return kernel.astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)",
             "return kernel.astype(np.float32), ((bias + mean) * scale + beta).astype(np.float32)",
             ("tests/test_quantisation_aware.py",), "folded_copy",
             "batch norm folded with the moving mean added instead of subtracted"),
    Mutation("front_end_counts_regular_convolutions_only", "tbhvae/export/tflite.py",
             'seen += op["op_name"] in CONVOLUTION_OPS',
             'seen += op["op_name"] == "CONV_2D"',
             ("tests/test_quantisation_aware.py",), "front_end",
             "the float front end of int8 image encoders skips depthwise convolutions when it counts"),
    Mutation("simulated_front_end_output_float", "tbhvae/export/quantisation_aware.py",
             "fake_quant and convolutions >= float_convolutions",
             "fake_quant and convolutions > float_convolutions",
             ("tests/test_quantisation_aware.py",), "front_end",
             "the simulation leaves the float front end's int8 output unrounded"),
)

_BOOT = r'''
import os, sys
root = os.path.realpath(sys.argv.pop(1))
import tbhvae
where = os.path.realpath(tbhvae.__file__)
if not where.startswith(root + os.sep):
    print(f"mutants: tbhvae imported from {where}, not from the copy {root}", flush=True)
    sys.exit(97)
print(f"mutants: tbhvae imported from {where}", flush=True)
import pytest
sys.exit(pytest.main(sys.argv[1:]))
'''
_WRONG_IMPORT = 97


@dataclasses.dataclass
class Result:
    name: str
    status: str  # caught | SURVIVED | NOT FOUND | AMBIGUOUS | BROKEN | TIMEOUT | WRONG IMPORT
    caught_by: str = ""
    seconds: float = 0.0
    output: str = ""


def copy_tree(destination: Path) -> Path:
    """The working tree (no .git, caches) at destination/<repo name>, with ../shared linked like the original."""
    copy = destination / REPO_ROOT.name
    shutil.copytree(REPO_ROOT, copy, ignore=_IGNORED, symlinks=True)
    shared = REPO_ROOT.parent / "shared"
    if shared.exists():
        (destination / "shared").symlink_to(shared, target_is_directory=True)
    return copy


def run_pytest(copy: Path, args: list[str], basetemp: Path, timeout: float) -> tuple[int | None, str, float]:
    """Runs pytest in the copy (its tbhvae first on sys.path): (exit code or None on timeout, output, seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(copy), *filter(None, [os.environ.get("PYTHONPATH")])]),
               PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-c", _BOOT, str(copy), "-x", "-q", "-rfE", "--tb=short", "--show-capture=no",
               "-p", "no:cacheprovider", f"--basetemp={basetemp}", *args]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        output = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return None, output, time.perf_counter() - start
    return done.returncode, done.stdout, time.perf_counter() - start


def pytest_args(mutation: Mutation) -> list[str]:
    return [*mutation.tests, *(["-k", mutation.select] if mutation.select else [])]


def first_failure(output: str) -> str:
    """The node id of the first FAILED (else ERROR) test in pytest's short summary, or ""."""
    for kind in ("FAILED", "ERROR"):
        for line in output.splitlines():
            match = re.match(rf"{kind} (\S+::\S+)", line)
            if match:
                return match.group(1) + (" (error)" if kind == "ERROR" else "")
    return ""


def check(mutation: Mutation, copy: Path, scratch: Path, timeout: float) -> Result:
    count = mutation.located(copy)
    if count != 1:
        return Result(mutation.name, "NOT FOUND" if count == 0 else "AMBIGUOUS",
                      f"(its text occurs {count} times in {mutation.file})")
    path = copy / mutation.file
    original = path.read_text()
    path.write_text(original.replace(mutation.original, mutation.replacement))
    try:
        code, output, seconds = run_pytest(copy, pytest_args(mutation), scratch / f"pytest-{mutation.name}", timeout)
    finally:
        path.write_text(original)
    if code is None:
        return Result(mutation.name, "TIMEOUT", "", seconds, output)
    if code == _WRONG_IMPORT:
        return Result(mutation.name, "WRONG IMPORT", "", seconds, output)
    if code == 0:
        return Result(mutation.name, "SURVIVED", "", seconds, output)
    caught_by = first_failure(output)
    if code == 1 and caught_by:
        return Result(mutation.name, "caught", caught_by, seconds, output)
    return Result(mutation.name, "BROKEN", f"pytest exit code {code}", seconds, output)


def baseline_args(mutations) -> list[str]:
    """One pytest selection covering every mutation's tests: the union of the files, and a -k
    expression that ORs, per mutation and file, "<file stem> and (<its -k>)"."""
    paths, terms = {}, {}
    for m in mutations:
        for test in m.tests:
            path, _, node = test.partition("::")
            paths[path] = None
            parts = [Path(path).stem] + ([node.split("[")[0]] if node else []) + (
                [f"({m.select})"] if m.select else [])
            terms[" and ".join(parts)] = None
    return [*paths, "-k", " or ".join(f"({t})" for t in terms)]


def baseline(mutations, copy: Path, scratch: Path, timeout: float) -> bool:
    """Runs all the mutations' tests once on the unmutated copy; True when they pass."""
    code, output, seconds = run_pytest(copy, baseline_args(mutations), scratch / "pytest-baseline", timeout)
    passed = re.search(r"(\d+) passed", output)
    print(f"baseline (no mutation): {'ok' if code == 0 else f'FAILED (exit {code})'}, "
          f"{passed.group(1) if passed else 0} tests passed, {seconds:.0f} s", flush=True)
    if code != 0:
        print(_tail(output), flush=True)
    return code == 0


def _tail(output: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in output.rstrip().splitlines()[-lines:])


def format_table(results) -> str:
    rows = [("mutation", "caught by", "seconds")]
    for r in results:
        rows.append((r.name, r.caught_by if r.status == "caught" else f"{r.status} {r.caught_by}".strip(),
                     f"{r.seconds:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per pytest run")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output tail for every mutation")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
    chosen = [known[n] for n in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for m in chosen:
            found = m.located(REPO_ROOT) == 1
            print(f"{m.name}: {m.file}{'' if found else ' (TEXT NOT FOUND EXACTLY ONCE)'}: {m.why}\n"
                  f"    runs {' '.join(pytest_args(m))}")
        return 0
    assert len(known) == len(MUTATIONS), "mutation names must be unique"
    for m in chosen:
        if m.located(REPO_ROOT) != 1:
            print(f"{m.name}: its original text is not exactly once in {m.file}; update the entry", flush=True)

    with tempfile.TemporaryDirectory(prefix="tbhvae-mutants-") as scratch_name:
        scratch = Path(scratch_name)
        copy = copy_tree(scratch)
        print(f"copy of {REPO_ROOT} at {copy}", flush=True)
        if not args.no_baseline and not baseline(chosen, copy, scratch, args.timeout):
            print("error: the selected tests fail without any mutation; fix them first", file=sys.stderr)
            return 1
        results = []
        for mutation in chosen:
            result = check(mutation, copy, scratch, args.timeout)
            results.append(result)
            print(f"{mutation.name}: {' '.join(filter(None, [result.status, result.caught_by]))} "
                  f"({result.seconds:.0f} s)", flush=True)
            if result.status != "caught" or args.verbose:
                if result.output:
                    print(_tail(result.output), flush=True)
    ran = [r for r in results if r.output]
    imported = [re.search(r"mutants: tbhvae imported from (\S+)", r.output) for r in ran]
    if ran:  # (the copy is gone by now; the path shows it was the copy's package)
        print(f"\ntbhvae imported from {', '.join(sorted({m.group(1) for m in imported if m})) or '?'} "
              f"in {sum(bool(m) for m in imported)} of {len(ran)} pytest runs")
    print()
    print(format_table(results))
    bad = [r for r in results if r.status != "caught"]
    print(f"\n{len(results) - len(bad)} of {len(results)} mutations caught"
          + (f"; not caught: {', '.join(r.name for r in bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
