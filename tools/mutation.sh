#!/usr/bin/env bash
# Mutation testing of ecospa's core with mutmut 3 (issue 15). One command, from a fresh clone:
#
#   bash tools/mutation.sh            # core: groups, select, prune, importance, optim, func/_layers
#   bash tools/mutation.sh io         # checkpoint.py's writer/reader + train.py's step wiring
#   bash tools/mutation.sh io 'ecospa.checkpoint.*'   # io with a chosen set of mutants (fnmatch)
#   bash tools/mutation.sh alloc      # allocation.py (issue 24; also func, io2, train, jobs, export:
#                                     # the profile table below lists their modules and tests)
#   bash tools/mutation.sh export     # jobs/export.py, with the tests that export in this process
#   bash tools/mutation.sh all        # every profile, one after the other
#
# It copies the tracked files (as they are in the working tree) to .mutation/<profile>/, runs
# `mutmut run` there with the [mutmut] section of setup.cfg (every profile but core swaps in its
# own module and test lists), and prints the score with tools/mutation_score.py, leaving out the
# equivalent mutants listed in tools/mutation_equivalents.md. Only the fast tests run
# (-m "not slow"). Inspect a profile afterwards with `cd .mutation/core && mutmut results`,
# `mutmut show NAME` or `mutmut browse`.
#
# Environment: PYTHON (default .venv/bin/python, else python3), JOBS (mutmut --max-children,
# default 1), MUTATION_DIR (default .mutation). mutmut is installed into that Python if missing.
# Slow: about 85 minutes for the core (1262 mutants) on two shared CPU cores. Not part of .ci/run.
set -euo pipefail
# The whole script is one { } block: bash parses it before running it, so an edit of this file
# while a profile runs (they take an hour) cannot change what the running copy does.
{

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PY=$(command -v "$PY")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute, symlinks kept (a venv's python)
JOBS=${JOBS:-1}
OUT=${MUTATION_DIR:-$ROOT/.mutation}
PROFILE=${1:-core}
shift || true

if ! "$PY" -c 'import mutmut, sys; sys.exit(int(mutmut.__version__.split(".")[0]) < 3)' 2>/dev/null; then
    echo "installing mutmut 3 into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
    "$PY" -m pip install -q "mutmut>=3.8,<4"
fi
MUTMUT=$(dirname "$PY")/mutmut
[ -x "$MUTMUT" ] || MUTMUT="$PY -m mutmut"

# The profiles: files to mutate, the fast test files that exercise them (every mutant reruns them
# with -x), and optionally the mutant-name patterns (fnmatch) run by default. `core` uses the
# [mutmut] section of setup.cfg as it is; every other profile swaps in its own file and test lists.
# Names given on the command line replace a profile's default patterns.
PROFILES=(core io alloc func io2 train jobs export s14)
profile_spec() {
    FILES=""; TESTS=""; NAMES=()
    case $1 in
        core) ;;  # setup.cfg as it is
        io)
            # the training step wiring (train/step.py and the pruning round of train/loop.py; a
            # mutant of train() itself would need a training run per test) and the checkpoint
            # writer/reader (io/checkpoint.py) without its manifest validators (_read_manifest,
            # _check_spec, _check_config, fuzzed by tests/test_checkpoint.py). Everything in the
            # checkpoint module: bash tools/mutation.sh io 'ecospa.io.checkpoint.*'
            FILES="ecospa/io/checkpoint.py ecospa/train/step.py ecospa/train/loop.py"
            TESTS="tests/test_checkpoint.py tests/test_mutants_io.py tests/test_train.py"
            NAMES=(
                'ecospa.train.step.x_lm_loss__mutmut_*' 'ecospa.train.step.x_make_step__mutmut_*'
                'ecospa.train.step.x_evaluate__mutmut_*' 'ecospa.train.step.x_estimator_for__mutmut_*'
                'ecospa.train.loop.x__prune_round__mutmut_*'
                'ecospa.io.checkpoint.x_save__*' 'ecospa.io.checkpoint.x__swap_in__*'
                'ecospa.io.checkpoint.x__write_tensors__*' 'ecospa.io.checkpoint.x__sha256__*'
                'ecospa.io.checkpoint.x__encode__*' 'ecospa.io.checkpoint.x__decode__*'
                'ecospa.io.checkpoint.x__leftovers__*' 'ecospa.io.checkpoint.x__manifest_sha256__*'
                'ecospa.io.checkpoint.x__resolve__*' 'ecospa.io.checkpoint.x__bad__*'
                'ecospa.io.checkpoint.x__verify_own_checksum__*' 'ecospa.io.checkpoint.x__verify_file__*'
                'ecospa.io.checkpoint.x__read_tree__*' 'ecospa.io.checkpoint.x_load_full__*'
                'ecospa.io.checkpoint.x_load__*'
            ) ;;
        alloc)
            FILES="ecospa/allocation.py"
            TESTS="tests/test_allocation.py tests/test_multiple_of.py tests/test_mutants_outer.py" ;;
        func)
            # the padded layout, the cached decoder, layer-wise reconstruction and the block driver
            # they share; without the greedy-generation and torch.compile tests (15 s; the jobs
            # profile has generation). Not run by default: compiled_decoder (only the slow
            # torch.compile test reaches it) and _block's block() and passthrough(), which run only
            # while the family modules are imported, before mutmut's forkserver picks a mutant
            # (mutmut cannot kill them; check them with MUTANT_UNDER_TEST set before the import)
            FILES="ecospa/func/padding.py ecospa/func/decode.py ecospa/func/reconstruct.py ecospa/func/_block.py"
            TESTS="tests/test_padding.py tests/test_decode.py tests/test_reconstruct.py tests/test_mutants_outer.py
                   --deselect tests/test_decode.py::test_greedy_tokens_equal_reference
                   --deselect tests/test_reconstruct.py::test_refit_model_compiles_and_matches_eager"
            NAMES=(
                'ecospa.func.padding.*' 'ecospa.func.reconstruct.*'
                'ecospa.func.decode.x__decoder__*' 'ecospa.func.decode.x_init_cache__*'
                'ecospa.func.decode.x_decode__*'
                'ecospa.func._block.xǁSublayerǁ*' 'ecospa.func._block.x_run__*'
                'ecospa.func._block.x__write__*' 'ecospa.func._block.x__attend_cache__*'
                'ecospa.func._block.x_attend__*' 'ecospa.func._block.x_positions__*'
            ) ;;
        io2)
            # the export writers: hf_write (the atomic directory swap and what it may replace) and
            # hf_compact by default; gguf_export on request (bash tools/mutation.sh io2
            # 'ecospa.io.gguf_export.*'). _remote_modeling.py is not mutated: transformers loads a
            # copy of it as remote code, where a mutant cannot be switched on.
            FILES="ecospa/io/hf_write.py ecospa/io/hf_compact.py ecospa/io/gguf_export.py"
            TESTS="tests/test_export.py tests/test_gguf_export.py tests/test_reliability.py tests/test_mutants_outer.py
                   --deselect tests/test_reliability.py::test_failed_export_keeps_the_compressed_checkpoint
                   --deselect tests/test_reliability.py::test_compress_without_out_keeps_its_result_in_runs_compress
                   --deselect tests/test_reliability.py::test_compress_on_a_full_disk_is_one_line"
            NAMES=('ecospa.io.hf_write.*' 'ecospa.io.hf_compact.*') ;;
        train)
            # the run directory, checkpoint saving/resuming and the helpers of the training loop
            # (train() and _train() themselves need a training run per test: not mutated;
            # _prune_round is in the io profile)
            FILES="ecospa/train/rundir.py ecospa/train/saving.py ecospa/train/loop.py"
            TESTS="tests/test_safety_train.py tests/test_train.py tests/test_resume_config.py tests/test_mutants_outer.py"
            NAMES=('ecospa.train.rundir.*' 'ecospa.train.saving.*' 'ecospa.train.loop.xǁ*'
                   'ecospa.train.loop.x__choose__*' 'ecospa.train.loop.x__slice__*'
                   'ecospa.train.loop.x__keep_from_json__*' 'ecospa.train.loop.x__targets__*') ;;
        jobs)
            # the compress job (run it first: bash tools/mutation.sh jobs 'ecospa.jobs.compress.*'),
            # its Job checks, generation and the lm-eval adapter. A mutant of compress() runs every
            # test that compresses: here only the fast ones, on an in-memory model
            # (test_mutants_jobs, test_kept_units, test_options; about 0.1 s a job once
            # torch._dynamo is imported); the jobs that load a GGUF file (1-7 s each, in
            # test_compress, test_layerwise, test_safety_io_cli) are left out: test_mutants_jobs
            # repeats their provenance, layer-wise and export checks in memory. Not mutated by
            # default: latency(), the progress bars' helpers and export.py (its tests, test_export,
            # test_gguf_export, test_export_tokens, are not in this selection: profile export).
            FILES="ecospa/jobs/compress.py ecospa/jobs/compress_job.py ecospa/jobs/export.py ecospa/jobs/generate.py ecospa/jobs/harness.py"
            TESTS="tests/test_mutants_jobs.py tests/test_kept_units.py tests/test_options.py tests/test_provenance.py
                   tests/test_held_out_text.py tests/test_generate_errors.py tests/test_harness.py
                   tests/test_boundaries.py tests/test_decode.py tests/test_mutants_outer.py
                   tests/test_compress.py::test_bad_target_is_a_clear_error
                   tests/test_compress.py::test_registry_error_names_the_install_command
                   --deselect tests/test_provenance.py::test_every_stage_reads_train_and_every_reported_number_val"
            NAMES=('ecospa.jobs.compress.x__clean_cut__*' 'ecospa.jobs.compress.x__keep__*'
                   'ecospa.jobs.compress.x__calib_grads__*' 'ecospa.jobs.compress.x__owned__*'
                   'ecospa.jobs.compress.x__losses__*' 'ecospa.jobs.compress.x__compress__*'
                   'ecospa.jobs.compress.x__nbytes__*' 'ecospa.jobs.compress.x__sizes__*'
                   'ecospa.jobs.compress.x__tokenizer_spec__*' 'ecospa.jobs.compress.x__save__*'
                   'ecospa.jobs.compress.x_leading_ids__*'
                   'ecospa.jobs.compress.x_group_params__*' 'ecospa.jobs.compress.x_recover__*'
                   'ecospa.jobs.compress.x_check_finite__*' 'ecospa.jobs.compress.x_compress__*'
                   'ecospa.jobs.compress.x_message_of__*' 'ecospa.jobs.compress.x_table__*'
                   'ecospa.jobs.compress_job.*' 'ecospa.jobs.generate.*' 'ecospa.jobs.harness.*') ;;
        export)
            # the export job (issue 24): format dispatch, the output checks (--out never the input,
            # --overwrite, .gguf names), the tokenizer files and notes, and the source readers
            # (source_gguf, source_*_info, source_special_tokens). The tests that export in this
            # process, on tiny models built in the test (test_reliability's export checks only:
            # its compress, train and lock tests and the killed-export subprocesses are left out)
            FILES="ecospa/jobs/export.py"
            TESTS="tests/test_mutants_export.py tests/test_export.py tests/test_gguf_export.py tests/test_export_tokens.py
                   tests/test_export_f16.py tests/test_declared_sizes.py tests/test_rope_scaling.py tests/test_vit.py
                   tests/test_mutants_outer.py tests/test_cli_options.py
                   tests/test_hf.py::test_attention_pruned_qwen3_exports_padded_to_stock_transformers
                   tests/test_boundaries.py::test_remote_code_labels_loss_is_the_shifted_cross_entropy_without_ignored_positions
                   tests/test_reliability.py::test_export_onto_its_own_input_is_refused
                   tests/test_reliability.py::test_second_export_needs_overwrite
                   tests/test_reliability.py::test_export_on_a_full_disk_is_one_line_and_keeps_the_previous
                   tests/test_reliability.py::test_exported_files_follow_the_umask" ;;
        s14)
            # session 14's new functions (issue 24): the blocked Gram product and the SPD inverse of
            # layer-wise reconstruction, the carried importance (blend_scores, kept_scores) and its
            # wiring into the training loop; the fast tests only. Also run by name (docs/TESTING.md):
            # the carry check, 'ecospa.schedule.xǁPruneScheduleǁ__post_init____mutmut_34' to _42 (numbers
            # of 2026-12-07; that check is now errors.check_fraction), and the Gram/inverse lines of x_reconstruct and x_obs_scores
            FILES="ecospa/func/reconstruct.py ecospa/schedule.py ecospa/train/loop.py"
            TESTS="tests/test_reconstruct.py tests/test_carry.py tests/test_mutants_io.py
                   --deselect tests/test_reconstruct.py::test_refit_model_compiles_and_matches_eager"
            NAMES=('ecospa.func.reconstruct.x__gram__*' 'ecospa.func.reconstruct.x__spd_inverse__*'
                   'ecospa.schedule.x__normalized__*' 'ecospa.schedule.x_blend_scores__*'
                   'ecospa.schedule.x_kept_scores__*' 'ecospa.train.loop.x__carried__*'
                   'ecospa.train.loop.x__carry_on__*' 'ecospa.train.loop.x__prune_round__*') ;;
        *)
            echo "unknown profile $1 (${PROFILES[*]} or all)" >&2
            exit 2 ;;
    esac
}

run_profile() {
    local profile=$1; shift
    local work=$OUT/$profile
    rm -rf "$work"
    mkdir -p "$work"
    # the tracked files as they are in the working tree (deleted ones skipped)
    git ls-files -z | "$PY" -c '
import os, shutil, sys
work = sys.argv[1]
for path in sys.stdin.buffer.read().decode().split("\0"):
    if path and os.path.isfile(path):
        os.makedirs(os.path.join(work, os.path.dirname(path)), exist_ok=True)
        shutil.copy2(path, os.path.join(work, path))
' "$work"
    profile_spec "$profile"
    local names=("$@")
    if [ -n "$FILES" ]; then
        "$PY" - "$work/setup.cfg" "$FILES" "$TESTS" <<'PYCFG'
import configparser, sys
path, files, tests = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
cfg = configparser.ConfigParser()
cfg.read(path)
cfg["mutmut"]["only_mutate"] = "\n" + "\n".join(files)
cfg["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
with open(path, "w") as f:
    cfg.write(f)
PYCFG
    fi
    if [ ${#names[@]} -eq 0 ] && [ ${#NAMES[@]} -gt 0 ]; then
        names=("${NAMES[@]}")
    fi
    echo "== mutmut run ($profile) in $work" >&2
    local start=$SECONDS
    (cd "$work" && OMP_NUM_THREADS=1 $MUTMUT run --max-children "$JOBS" "${names[@]}" >"$work/mutmut-run.log" 2>&1) || {
        tail -c 3000 "$work/mutmut-run.log" >&2
        echo "mutmut run failed (log: $work/mutmut-run.log)" >&2
        exit 1
    }
    echo "== $profile: $((SECONDS - start)) s; score (equivalents from tools/mutation_equivalents.md):"
    (cd "$work" && "$PY" "$ROOT/tools/mutation_score.py" --equivalents "$ROOT/tools/mutation_equivalents.md" \
        --json "$work/score.json" "${names[@]}") || status=1
}

status=0
case "$PROFILE" in
    all) for p in "${PROFILES[@]}"; do run_profile "$p"; done ;;
    *) run_profile "$PROFILE" "$@" ;;
esac
exit $status
}
